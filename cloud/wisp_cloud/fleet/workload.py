"""Workload: the prompt set, session arrivals (Poisson per device) and SLOs, shared by bench and simulate."""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Named workloads: (prompt set, acceptance trace), relative to the repository root.
WORKLOADS: dict[str, tuple[str, str]] = {
    "code10": ("bench/prompts/code10.jsonl", "bench/traces/qwen-coder.json"),
    "sharegpt": ("bench/workloads/sharegpt.json", "bench/traces/sharegpt.json"),
    "humaneval": ("bench/workloads/humaneval.json", "bench/traces/humaneval.json"),
}
_REPO = Path(__file__).resolve().parents[3]


def workload_paths(name: str) -> tuple[Path, Path]:
    """(prompt set, acceptance trace) of a named workload: in the working folder, else in the source tree."""
    from wisp_sdk.errors import WispError

    if name not in WORKLOADS:
        raise WispError(f"unknown workload {name!r} (have: {', '.join(WORKLOADS)})")

    def where(rel: str) -> Path:
        return Path(rel) if Path(rel).exists() or not (_REPO / rel).exists() else _REPO / rel

    prompts, trace = WORKLOADS[name]
    return where(prompts), where(trace)


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workload",
        choices=tuple(WORKLOADS),
        default="code10",
        help="named prompt set + acceptance trace (default code10)",
    )
    p.add_argument("--prompts", help="prompt set (JSONL or workload JSON; default: the workload's)")


def resolve_workload_args(args: argparse.Namespace, trace: bool) -> None:
    """Fill --prompts (and --trace) from --workload where they were not given."""
    prompts, trace_path = workload_paths(args.workload)
    args.prompts = args.prompts or str(prompts)
    if trace:
        args.trace = args.trace or str(trace_path)


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """A prompt set: JSONL with {"prompt": str, "max_new_tokens": int} per line (the output length a session
    asks for), or a workload file from `wisp bench workload` (JSON; its `requests` carry the same keys)."""
    from wisp_sdk.errors import WispError

    p = Path(path)
    if not p.is_file():
        raise WispError(f"no prompt set at {path}")
    text = p.read_text(encoding="utf-8")
    doc: Any = None
    try:
        doc = json.loads(text)  # a workload file; JSONL with several lines fails here ("extra data")
    except json.JSONDecodeError:
        pass
    try:
        if isinstance(doc, dict) and doc.get("kind") == "wisp-workload":
            items = list(doc.get("requests") or [])
        else:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise WispError(f"{path}: not a prompt set (JSONL) or workload file: {exc}") from exc
    if not items or any(not isinstance(it, dict) or "prompt" not in it for it in items):
        raise WispError(f"{path}: every line needs a 'prompt'")
    for it in items:
        it.setdefault("max_new_tokens", 128)
    return items


def workload_provenance(path: str | Path) -> dict[str, Any] | None:
    """The provenance of a workload file (None for a plain JSONL prompt set)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(doc, dict) and doc.get("kind") == "wisp-workload":
        return {"name": doc.get("name"), **dict(doc.get("provenance") or {})}
    return None


@dataclass(frozen=True)
class SLOSpec:
    ttft_ms: float = 2000.0
    tpot_ms: float = 60.0

    def met(self, ttft_ms: float, tpot_ms: float) -> bool:
        return ttft_ms <= self.ttft_ms and tpot_ms <= self.tpot_ms


@dataclass
class PlannedSession:
    device: int
    start_s: float  # offset from the run's start
    prompt_index: int
    max_new_tokens: int


def plan_sessions(
    n_devices: int,
    duration_s: float,
    prompts: list[dict[str, Any]],
    mean_gap_s: float,
    seed: int = 0,
    length_scale: float = 1.0,
) -> list[list[PlannedSession]]:
    """Per device, the sessions it starts: the first at a uniform offset in [0, mean_gap), then after each
    session ends an Exp(mean_gap) think time (so the fleet's arrivals are Poisson-like, closed loop per device).
    Here only the draws are fixed (prompt, length, gaps); start times of later sessions depend on when earlier
    ones end, so the list gives gaps in `start_s` for all but the first."""
    rng = random.Random(seed)
    plans: list[list[PlannedSession]] = []
    for d in range(n_devices):
        seq = []
        t = rng.uniform(0, mean_gap_s)
        budget = 2 + int(duration_s / max(mean_gap_s, 0.1)) + 8
        for j in range(budget):
            pi = rng.randrange(len(prompts))
            n = max(2, int(round(prompts[pi]["max_new_tokens"] * length_scale)))
            seq.append(PlannedSession(d, t if j == 0 else rng.expovariate(1.0 / mean_gap_s), pi, n))
        plans.append(seq)
    return plans
