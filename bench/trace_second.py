"""Add `second` (the draft's second choice is the target's token) to acceptance traces recorded before it.

    python bench/trace_second.py --draft runs/qwen2.5-coder-0.5b-q8 bench/traces/*.json

Runs the draft bundle alone over each sequence's kept target tokens (`fleet.trace.add_second`), checks that it
reproduces the trace's own acceptance records, and rewrites the trace in place. Emulated devices then replay the
sibling hits of token trees (`controller wisp+tree`). Prints, per trace, the acceptance agreement with the
recorded trace and P(second choice right | first rejected).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "cloud"), str(ROOT / "sdk")]

from wisp_cloud.fleet.trace import add_second  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draft", required=True, help="the draft bundle the traces were recorded with")
    ap.add_argument("traces", nargs="+")
    args = ap.parse_args()
    for path in args.traces:
        trace = add_second(path, args.draft)
        s, agree = trace["summary"], trace["second_added"]["accepted_agreement"]
        print(
            f"{path}: alpha {s['alpha']:.3f}, second right when first rejected {s['second_given_reject']:.3f}, "
            f"acceptance agreement with the recorded trace {agree:.4f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
