"""Soak: N concurrent real client sessions against a real `wisp serve` for a duration (issue 17, item 9).

The server is a `wisp serve --backend fake` subprocess (the real gateway, engine and scheduler; the model is the
tests' deterministic fake target, each forward sleeping `--step-ms`), so it runs on a CPU-only machine. Client
processes hold N websocket sessions that generate back to back: half greedy, half sampling (each draft token
sent with a sparse q), k draft tokens per round kept with probability `--alpha`; `--abandon` of the
generations (5 %) are abandoned mid-way (the socket dropped without a Close, the session left to expire).

Reports: client errors by kind (goal 0), server RSS over time (goal: flat after warm-up), server log bytes per
minute, and p50/p99 round latency (send → verdict, client side) per 10 s window and overall. Writes JSON and a PNG
(title, model, machine, date) to `--out`. A benchmark, not a test: it measures and asserts nothing.

    .venv/bin/python bench/soak.py --sessions 500 --duration 600 --out bench/results/soak/dev_vm_500x10min.json
    .venv/bin/python bench/soak.py --sessions 100 --duration 120 --out bench/results/soak/dev_vm_100x2min.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import platform
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

VOCAB = 1000  # the fake target's vocabulary (`wisp serve --backend fake`)
WINDOW_S = 10.0
# Round-latency histogram: log-spaced bins from 0.1 ms to 100 s (5 % wide), mergeable across processes.
_BINS = 290
_LO = 1e-4


def _bin(seconds: float) -> int:
    return min(_BINS - 1, max(0, int(math.log(max(seconds, _LO) / _LO) / math.log(1.05))))


def _percentile(hist: list[int], q: float) -> float | None:
    total = sum(hist)
    if not total:
        return None
    need, seen = q * total, 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= need:
            return 1e3 * _LO * 1.05 ** (i + 0.5)  # ms, the bin's middle
    return None


@dataclass
class _Tally:
    rounds: int = 0
    generations: int = 0
    abandoned: int = 0


def _client_proc(url: str, first: int, n: int, args: dict, t_end: float, out: mp.Queue) -> None:
    out.put(asyncio.run(_clients(url, first, n, args, t_end)))


async def _clients(url: str, first: int, n: int, args: dict, t_end: float) -> dict:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed
    from wisp_cloud.backends.fake import FAKE_FINGERPRINT, next_token
    from wisp_sdk.protocol import (
        SUBPROTOCOL,
        Close,
        Closed,
        Error,
        Hello,
        Open,
        Opened,
        Round,
        SamplingParams,
        Verdict,
        decode_server,
        encode,
        encode_round,
    )

    t_start = time.monotonic()
    windows = int((t_end - t_start) / WINDOW_S) + 2
    hist = [[0] * _BINS for _ in range(windows)]
    errors: Counter[str] = Counter()
    tally = _Tally()

    def error(kind: str) -> None:
        errors[kind] += 1

    async def generation(ws, rng: random.Random, sampling: bool) -> bool:
        """One generation; False when it was abandoned (the caller drops the connection)."""
        prompt = [rng.randrange(VOCAB) for _ in range(args["prompt_len"])]
        sp = SamplingParams(temperature=1.0, seed=rng.randrange(1 << 30)) if sampling else SamplingParams()
        await ws.send(encode(Open(prompt_ids=prompt, max_new_tokens=args["max_new"], sampling=sp)))
        opened = decode_server(await ws.recv())
        if not isinstance(opened, Opened):
            error(f"open:{opened.code.value}" if isinstance(opened, Error) else "open:unexpected")
            await asyncio.sleep(0.5)
            return True
        abandon_at = rng.randrange(1, 20) if rng.random() < args["abandon"] else -1
        tokens, rnd, done = prompt + [opened.next_token], 0, opened.done
        while not done and time.monotonic() < t_end:
            if rnd == abandon_at:
                tally.abandoned += 1
                return False
            draft, prev = [], tokens[-1]
            for j in range(args["k"]):
                tok = next_token(prev, len(tokens) - 1 + j, VOCAB)
                if rng.random() >= args["alpha"]:
                    tok = (tok + 1) % VOCAB
                draft.append(tok)
                prev = tok
            rnd += 1
            # sampling: q as a drafter sends it, on its support (the drafted token and one alternative)
            msg = Round(
                session_id=opened.session_id,
                round=rnd,
                committed_len=len(tokens),
                draft_ids=draft,
                q_ids=[[t, (t + 7) % VOCAB] for t in draft] if sampling else None,
                q_probs=[[0.75, 0.25] for _ in draft] if sampling else None,
            )
            t0 = time.monotonic()
            await ws.send(encode_round(msg))
            v = decode_server(await ws.recv())
            t1 = time.monotonic()
            if not isinstance(v, Verdict):
                error(f"round:{v.code.value}" if isinstance(v, Error) else "round:unexpected")
                return True
            hist[min(windows - 1, int((t1 - t_start) / WINDOW_S))][_bin(t1 - t0)] += 1
            tally.rounds += 1
            tokens += draft[: v.accepted] + [v.next_token]
            done = v.done
        await ws.send(encode(Close(session_id=opened.session_id)))  # as the SDK does: free the slot now
        if not isinstance(decode_server(await ws.recv()), Closed):
            error("close:unexpected")
        tally.generations += 1
        return True

    async def session(i: int) -> None:
        rng = random.Random(i)
        sampling = i % 2 == 1
        await asyncio.sleep(rng.uniform(0, args["ramp_s"]))  # spread the connects
        while time.monotonic() < t_end:
            try:
                async with connect(url, subprotocols=[SUBPROTOCOL], compression=None, open_timeout=60) as ws:
                    await ws.send(encode(Hello(tokenizer_fingerprint=FAKE_FINGERPRINT, client="soak")))
                    decode_server(await ws.recv())
                    while time.monotonic() < t_end:
                        if not await generation(ws, rng, sampling):
                            ws.transport.abort()  # abandoned: no Close, the server expires it
                            break
            except (ConnectionClosed, OSError, TimeoutError) as exc:
                if time.monotonic() < t_end:
                    error(f"connection:{type(exc).__name__}")
                    await asyncio.sleep(0.5)

    await asyncio.gather(*(session(first + i) for i in range(n)))
    return {"hist": hist, "errors": dict(errors), **asdict(tally)}


def _start_server(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "wisp_sdk.cli",
        "serve",
        "--backend",
        "fake",
        "--fake-step-ms",
        str(args.step_ms),
        "--port",
        "0",
        "--policy",
        args.policy,
        "--max-batch",
        str(args.max_batch),
        "--session-ttl",
        str(args.session_ttl),
        "--admission-target",
        "0",
        # every client is anonymous, one tenant: room for all sessions plus the abandoned ones until their TTL
        "--max-sessions-per-token",
        str(4 * args.sessions),
        "--max-sessions",
        str(4 * args.sessions),
    ]
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}; see {log_path}")
    return proc, line.split()[-1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _run(args: argparse.Namespace) -> dict:
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(args.server_log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    server, url = _start_server(args, log_path)
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    t_end = time.monotonic() + args.duration
    per = [
        args.sessions // args.procs + (1 if i < args.sessions % args.procs else 0) for i in range(args.procs)
    ]
    knobs = {k: getattr(args, k) for k in ("k", "alpha", "abandon", "prompt_len", "max_new", "ramp_s")}
    procs, first = [], 0
    for m in per:
        if m:
            p = ctx.Process(target=_client_proc, args=(url, first, m, knobs, t_end, queue))
            p.start()
            procs.append(p)
            first += m
    samples = []
    t0 = time.monotonic()
    while time.monotonic() < t_end:
        samples.append(
            {
                "t_s": round(time.monotonic() - t0, 1),
                "rss_mb": _rss_mb(server.pid),
                "log_bytes": log_path.stat().st_size,
            }
        )
        print(f"t={samples[-1]['t_s']:6.1f}s  server RSS {samples[-1]['rss_mb']:7.1f} MB", flush=True)
        await asyncio.sleep(args.sample_s)
    results = [await asyncio.to_thread(queue.get) for _ in procs]
    for p in procs:
        p.join()
    samples.append(
        {
            "t_s": round(time.monotonic() - t0, 1),
            "rss_mb": _rss_mb(server.pid),
            "log_bytes": log_path.stat().st_size,
        }
    )
    server.terminate()
    server.wait(timeout=60)

    windows = max(len(r["hist"]) for r in results)
    merged = [
        [sum(r["hist"][w][b] for r in results if w < len(r["hist"])) for b in range(_BINS)]
        for w in range(windows)
    ]
    overall = [sum(merged[w][b] for w in range(windows)) for b in range(_BINS)]
    errors: dict[str, int] = {}
    for r in results:
        for kind, n in r["errors"].items():
            errors[kind] = errors.get(kind, 0) + n
    warm = [s for s in samples if s["t_s"] >= args.warmup_s] or samples
    log_bytes = samples[-1]["log_bytes"]
    return {
        "args": vars(args),
        "machine": args.machine,
        "date": args.date,
        "model": f"FakeBackend (vocab {VOCAB}, {args.step_ms} ms per forward)",
        "rounds": sum(r["rounds"] for r in results),
        "generations": sum(r["generations"] for r in results),
        "abandoned": sum(r["abandoned"] for r in results),
        "errors": errors,
        "error_total": sum(errors.values()),
        "round_ms": {"p50": _percentile(overall, 0.5), "p99": _percentile(overall, 0.99)},
        "round_ms_by_window": [
            {"t_s": w * WINDOW_S, "p50": _percentile(h, 0.5), "p99": _percentile(h, 0.99), "rounds": sum(h)}
            for w, h in enumerate(merged)
            if sum(h)
        ],
        "rss_mb": samples,
        "rss_growth_after_warmup_mb": warm[-1]["rss_mb"] - warm[0]["rss_mb"],
        "log_bytes": log_bytes,
        "log_bytes_per_min": log_bytes / (args.duration / 60.0),
    }


def _plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    rss = data["rss_mb"]
    ax1.plot([s["t_s"] for s in rss], [s["rss_mb"] for s in rss], "-", label="server RSS (MB)")
    ax1.set_ylabel("server RSS (MB)")
    ax1b = ax1.twinx()
    ax1b.plot([s["t_s"] for s in rss], [s["log_bytes"] / 1e6 for s in rss], ":", color="C2", label="log (MB)")
    ax1b.set_ylabel("server log (MB)")
    ax1.legend(loc="upper left", fontsize=8)
    ax1b.legend(loc="lower right", fontsize=8)
    win = data["round_ms_by_window"]
    ax2.plot([w["t_s"] for w in win], [w["p50"] for w in win], "o-", label="round p50")
    ax2.plot([w["t_s"] for w in win], [w["p99"] for w in win], "s-", label="round p99")
    ax2.set_yscale("log")
    ax2.set_ylabel(f"round latency (ms, {WINDOW_S:.0f} s windows)")
    ax2.set_xlabel("seconds since start")
    ax2.legend(fontsize=8)
    a = data["args"]
    fig.suptitle(
        f"WISP soak: {a['sessions']} sessions × {a['duration']:.0f} s, half sampling, {a['abandon']:.0%} of "
        f"generations abandoned; client errors {data['error_total']}\n"
        f"{data['model']}, {a['policy']} policy\n{data['machine']}, {data['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description="Soak a real `wisp serve` with N concurrent client sessions.")
    ap.add_argument("--sessions", type=int, default=500)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    ap.add_argument("--procs", type=int, default=4, help="client processes")
    ap.add_argument("--k", type=int, default=4, help="draft tokens per round")
    ap.add_argument("--alpha", type=float, default=0.8, help="per-token draft acceptance")
    ap.add_argument("--abandon", type=float, default=0.05, help="share of generations abandoned mid-way")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--step-ms", type=float, default=5.0, help="fake forward: ms per step")
    ap.add_argument("--policy", default="wisp", choices=["fifo", "wisp", "sled"])
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument(
        "--session-ttl", type=float, default=30.0, help="server: abandoned sessions expire after this"
    )
    ap.add_argument(
        "--ramp-s", type=float, default=10.0, help="clients connect spread over this many seconds"
    )
    ap.add_argument("--warmup-s", type=float, default=30.0, help="RSS growth is measured after this")
    ap.add_argument("--sample-s", type=float, default=5.0, help="RSS and log size sampled this often")
    ap.add_argument("--machine", default=f"{platform.node()} ({os.cpu_count()} cores)")
    ap.add_argument("--date", default=date.today().isoformat())
    ap.add_argument("--out", default="bench/results/soak/soak.json")
    ap.add_argument(
        "--server-log", default="runs/soak/server.log", help="the server's log (its size is measured)"
    )
    ap.add_argument("--replot", metavar="JSON", help="only redraw the PNG of an earlier run's JSON")
    args = ap.parse_args()
    if args.replot:
        _plot(json.loads(Path(args.replot).read_text()), Path(args.replot).with_suffix(".png"))
        return 0
    if args.sessions < 1 or args.duration <= 0 or args.procs < 1 or not 0 <= args.abandon <= 1:
        ap.error("--sessions, --procs >= 1, --duration > 0, --abandon in [0, 1]")
    data = asyncio.run(_run(args))
    out = Path(args.out)
    out.write_text(json.dumps(data, indent=1) + "\n")
    _plot(data, out.with_suffix(".png"))
    print(
        f"rounds {data['rounds']}  generations {data['generations']}  abandoned {data['abandoned']}  "
        f"errors {data['error_total']} {data['errors']}\n"
        f"round p50 {data['round_ms']['p50']:.1f} ms  p99 {data['round_ms']['p99']:.1f} ms  "
        f"RSS growth after warm-up {data['rss_growth_after_warmup_mb']:+.1f} MB  "
        f"log {data['log_bytes_per_min'] / 1e3:.1f} kB/min\nwrote {out} and {out.with_suffix('.png')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
