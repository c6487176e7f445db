"""Workload: the prompt set, session arrivals (Poisson per device) and SLOs, shared by bench and simulate."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """JSONL: {"prompt": str, "max_new_tokens": int} per line (the output length a session asks for)."""
    from wisp_sdk.errors import WispError

    p = Path(path)
    if not p.is_file():
        raise WispError(f"no prompt set at {path}")
    items = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    if not items or any("prompt" not in it for it in items):
        raise WispError(f"{path}: every line needs a 'prompt'")
    for it in items:
        it.setdefault("max_new_tokens", 128)
    return items


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
