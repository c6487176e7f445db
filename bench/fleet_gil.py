"""How much a busy fleet process stretches its emulated drafts: the GIL's switch interval (dev VM, no GPU).

An emulated device drafts by sleeping the device profile's time per token on its client's drafting thread
(fleet/emulated.py), while the process's event loop runs every other device's frames. A thread waking from its
sleep waits for the GIL until the loop yields or the switch interval (Python's default 5 ms) forces a hand-over, so
a loop busy in long bursts adds to every emulated draft, which the server then measures as device time. This
emulates N devices drafting k tokens at `--token-ms` each, beside a loop busy `--busy` of the time in bursts of
`--burst-ms`, and reports the drafts' median time against the ideal k × token-ms, at each switch interval:

    python3 bench/fleet_gil.py --out bench/results/host_path/fleet_gil.json

A benchmark: it measures and asserts nothing. Run it pinned to one core (`taskset -c 1`), as a fleet process is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path


def _draft(k: int, token_s: float) -> float:
    t = time.perf_counter()
    for _ in range(k):
        time.sleep(token_s)
    return time.perf_counter() - t


async def _point(args: argparse.Namespace, interval: float, busy: float) -> dict:
    sys.setswitchinterval(interval)
    pools = [ThreadPoolExecutor(1) for _ in range(args.devices)]
    end = time.perf_counter() + args.seconds
    drafts: list[float] = []
    rounds: list[float] = []

    async def device(i: int) -> None:
        loop = asyncio.get_running_loop()
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            drafts.append(await loop.run_in_executor(pools[i], _draft, args.k, args.token_ms / 1e3))
            rounds.append(time.perf_counter() - t0)
            await asyncio.sleep(args.gap_ms / 1e3)

    async def loop_work() -> None:  # the other devices' frames: CPU in bursts, then a yield
        burst = args.burst_ms / 1e3
        while time.perf_counter() < end:
            t = time.perf_counter()
            while time.perf_counter() - t < burst * busy:
                pass
            await asyncio.sleep(burst * (1 - busy))

    await asyncio.gather(loop_work(), *(device(i) for i in range(args.devices)))
    for p in pools:
        p.shutdown()
    drafts.sort()
    rounds.sort()
    row = {
        "switch_interval_s": interval,
        "busy": busy,
        "draft_ms_p50": 1e3 * drafts[len(drafts) // 2],
        "draft_ms_ideal": args.k * args.token_ms,
        "round_ms_p50": 1e3 * rounds[len(rounds) // 2],
        "drafts": len(drafts),
    }
    print(
        f"switch interval {1e3 * interval:.0f} ms, loop busy {busy:.0%}: draft p50 {row['draft_ms_p50']:.1f} ms "
        f"(ideal {row['draft_ms_ideal']:.1f}), with the hop back to the loop {row['round_ms_p50']:.1f} ms",
        flush=True,
    )
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=40, help="devices in the process (default 40)")
    ap.add_argument("--k", type=int, default=5, help="draft tokens a round (default 5)")
    ap.add_argument("--token-ms", type=float, default=5.2, help="emulated draft ms a token (Mac mini: 5.2)")
    ap.add_argument("--gap-ms", type=float, default=30.0, help="a device's time between drafts (default 30)")
    ap.add_argument("--burst-ms", type=float, default=20.0, help="the loop's bursts of work (default 20)")
    ap.add_argument("--busy", type=float, nargs="+", default=[0.3, 0.6])
    ap.add_argument("--intervals", type=float, nargs="+", default=[0.005, 0.001])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/host_path/fleet_gil.json"))
    args = ap.parse_args()
    rows = [asyncio.run(_point(args, i, b)) for i in args.intervals for b in args.busy]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "fleet_gil",
                "machine": f"dev VM ({platform.machine()}, {platform.python_version()})",
                "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
                "args": {k: v for k, v in vars(args).items() if k != "out"},
                "rows": rows,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
