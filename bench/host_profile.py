"""Compare the server's sampled host stacks of two arms (`wisp serve --sample-host DIR`, wisp_cloud/host_sampler.py).

Each file holds one benchmark point's collapsed stacks (`thread;outer;...;inner count`). For one thread (the event
loop's `MainThread` by default, where the gateway, the scheduling and the commit run; `wisp-forward` is the
engine's forward worker) this prints, per function, the share of the point's wall time that thread spent in it
(inclusive: the function anywhere on the stack; `--self`: innermost only), for A and B side by side, largest
difference first:

    .venv/bin/python bench/host_profile.py host-003-centralized.txt host-004-wisp.txt --top 30 \
      --out bench/results/host_path/h200-run63-profile.json

An analysis of recorded samples: it measures nothing itself and asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def load(path: Path, thread: str, self_only: bool) -> tuple[dict[str, float], dict[str, str]]:
    """Per function, the share of the file's samples (all of `thread`'s stacks; a sample is one stack per
    thread) in which it was on `thread`'s stack (or innermost). Also the header's fields."""
    header: dict[str, str] = {}
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            header = dict(w.split("=", 1) for w in line[1:].split() if "=" in w)
            continue
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if not frames[0].startswith(thread):
            continue
        k = int(n)
        total += k
        funcs = frames[-1:] if self_only else set(frames[1:])
        for f in funcs:
            counts[f] += k
    samples = int(header.get("samples", total) or total)
    return {f: c / max(samples, 1) for f, c in counts.items()}, header


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--thread", default="MainThread", help="thread name prefix (default MainThread)")
    ap.add_argument("--self", dest="self_only", action="store_true", help="innermost frames only")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", type=Path, help="also write the table as JSON")
    args = ap.parse_args()
    a, ha = load(args.a, args.thread, args.self_only)
    b, hb = load(args.b, args.thread, args.self_only)
    rows = sorted(
        ({"function": f, "a": a.get(f, 0.0), "b": b.get(f, 0.0)} for f in set(a) | set(b)),
        key=lambda r: -abs(r["b"] - r["a"]),
    )[: args.top]
    print(
        f"A: {args.a.name} {ha}\nB: {args.b.name} {hb}\nthread {args.thread}, share of wall time (inclusive"
        f"{', self only' if args.self_only else ''}):"
    )
    print(f"{'A %':>7} {'B %':>7} {'B-A':>7}  function")
    for r in rows:
        print(f"{100 * r['a']:7.1f} {100 * r['b']:7.1f} {100 * (r['b'] - r['a']):+7.1f}  {r['function']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "a": str(args.a),
                    "b": str(args.b),
                    "header_a": ha,
                    "header_b": hb,
                    "thread": args.thread,
                    "self_only": args.self_only,
                    "rows": rows,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
