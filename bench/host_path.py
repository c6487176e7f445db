"""Host path of the verifier: µs of server work per session per step, with a model that costs no host time.

The real gateway and engine (`wisp_cloud.server.WispServer`) run with `FakeBackend`, whose forward sleeps like a
GPU pass (`--base-ms` + `--per-token-us` × tokens, GIL released). N real websocket sessions from client processes
(pinned to other cores than the server where the machine has them) draft k tokens per round from the fake target's
own continuation, each token kept with probability `--alpha`, and send rounds back to back. Over the measured
window the server's running step totals give:

  host µs / session / step = (Σ whole step − Σ forward) ÷ Σ sessions-in-step   (the engine's critical path)
  device idle share        = (Σ whole step − Σ forward) ÷ Σ whole step         (a GPU would sit idle this long)

    .venv/bin/python bench/host_path.py --sessions 64 128 256 512 1024 --out bench/results/host_path/dev_vm.json

With `--policy centralized` (or `--decoded` under any policy) the sessions are centralized ones (the server
decodes; one Tokens frame per step). With `--regime-centralized` (`--policy wisp`) the regime holds the centralized
mode from the start: sessions open speculative and the hybrid moves each to server decoding at its first verdict,
as on a GPU once the regime has decided to decode (H200 run 52: WISP's host time per step there was 19 ms against
centralized's 12 at ≈ 470 decodes).
Writes JSON (and a PNG with --plot). A benchmark, not a test: it measures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import random
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

FINGERPRINT_VOCAB = 1000


def _client_proc(
    url: str,
    n_sessions: int,
    k: int,
    alpha: float,
    prompt_len: int,
    max_new: int,
    seconds: float,
    cores: list[int] | None,
    seed: int,
    central: bool,
    draft_ms: float,
    out: mp.Queue,
) -> None:
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    out.put(
        asyncio.run(
            _clients(url, n_sessions, k, alpha, prompt_len, max_new, seconds, seed, central, draft_ms)
        )
    )


async def _clients(
    url: str,
    n: int,
    k: int,
    alpha: float,
    prompt_len: int,
    max_new: int,
    seconds: float,
    seed: int,
    central: bool,
    draft_ms: float = 0.0,
) -> dict:
    from websockets.asyncio.client import connect
    from wisp_cloud.backends.fake import FAKE_FINGERPRINT, next_token
    from wisp_sdk.protocol import (
        SUBPROTOCOL,
        Hello,
        Open,
        Opened,
        Round,
        Tokens,
        Verdict,
        decode_server,
        encode,
        encode_round,
    )

    rng = random.Random(seed)
    stop_at = time.monotonic() + seconds
    rounds = 0
    errors = 0
    # Σ seconds from sending a round to its verdict (the server's part of the round, and loopback)
    waited = 0.0

    async def decoded(ws: Any, done: bool) -> bool:
        """The server decodes the session: one Tokens frame per step until done. Returns `done` (still False
        after a frame that is not Tokens, which counts as an error)."""
        nonlocal rounds, errors
        while not done:
            t = decode_server(await ws.recv())
            if not isinstance(t, Tokens):
                errors += 1
                break
            rounds += 1
            done = t.done
        return done

    async def one(i: int) -> None:
        nonlocal rounds, errors, waited
        async with connect(
            url, subprotocols=[SUBPROTOCOL], compression=None, max_size=1 << 24, open_timeout=60
        ) as ws:
            await ws.send(encode(Hello(tokenizer_fingerprint=FAKE_FINGERPRINT)))
            decode_server(await ws.recv())
            while time.monotonic() < stop_at:
                prompt = [rng.randrange(FINGERPRINT_VOCAB) for _ in range(prompt_len)]
                mode = "centralized" if central else "speculative"
                await ws.send(encode(Open(prompt_ids=prompt, max_new_tokens=max_new, mode=mode)))
                msg = decode_server(await ws.recv())
                if not isinstance(msg, Opened):
                    errors += 1
                    await asyncio.sleep(0.05)
                    continue
                if central:
                    await decoded(ws, msg.done)
                    continue
                sid, tokens, rnd, done = msg.session_id, prompt + [msg.next_token], 0, msg.done
                while not done and time.monotonic() < stop_at:
                    draft, prev, pos = [], tokens[-1], len(tokens) - 1
                    for _ in range(k):
                        tok = next_token(prev, pos, FINGERPRINT_VOCAB)
                        if rng.random() >= alpha:
                            tok = (tok + 1) % FINGERPRINT_VOCAB  # a draft the target rejects
                        draft.append(tok)
                        prev, pos = tok, pos + 1
                    rnd += 1
                    if draft_ms > 0.0:  # the device drafting: the round reaches the server mid-step
                        await asyncio.sleep(draft_ms / 1e3)
                    sent = time.perf_counter()
                    await ws.send(
                        encode_round(
                            Round(session_id=sid, round=rnd, committed_len=len(tokens), draft_ids=draft)
                        )
                    )
                    v = decode_server(await ws.recv())
                    if not isinstance(v, Verdict):
                        errors += 1
                        break
                    tokens += draft[: v.accepted] + [v.next_token]
                    rounds += 1
                    waited += time.perf_counter() - sent
                    done = v.done
                    if v.centralize:  # moved to server decoding
                        done = await decoded(ws, done)

    await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=False)
    return {"rounds": rounds, "errors": errors, "waited_s": waited}


async def _measure(args: argparse.Namespace, n: int) -> dict:
    from wisp_cloud.backends.fake import FakeBackend
    from wisp_cloud.config import ServerConfig
    from wisp_cloud.server import WispServer, tune_runtime

    backend = FakeBackend(FINGERPRINT_VOCAB, base_s=args.base_ms / 1e3, per_token_s=args.per_token_us / 1e6)
    cfg = ServerConfig(
        port=0,
        policy=args.policy,
        max_batch=max(n, 1),
        max_sessions=4 * n + 64,
        max_sessions_per_token=4 * n + 64,
        admission_target=0.0,
        session_ttl_s=60.0,
    )
    server = WispServer(backend, cfg)
    await server.start()
    regime = server.engine.committer.regime
    if args.regime_centralized:
        if regime is None:
            raise SystemExit("--regime-centralized needs --policy wisp (the regime is WISP's)")
        # held, never re-decided (`wisp serve --decode-all`): as on a GPU, where a decision comes every 2 s, each
        # decoded token takes the short path (a regime that cannot decide would leave every token's full check due)
        regime.mode = regime.hold = "centralized"
        regime.probe_every = 1 << 30  # no probes
    if not args.no_tune_runtime:
        tune_runtime()  # as `wisp serve` does
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    server_cores, client_cores = (cpus[:1], cpus[1:]) if len(cpus) > 1 else (None, None)
    if server_cores:
        os.sched_setaffinity(0, server_cores)
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    procs = []
    per = [n // args.procs + (1 if i < n % args.procs else 0) for i in range(args.procs)]
    total_s = args.warmup + args.seconds
    for i, m in enumerate(per):
        if m:
            p = ctx.Process(
                target=_client_proc,
                args=(
                    server.url,
                    m,
                    args.k,
                    args.alpha,
                    args.prompt_len,
                    args.max_new,
                    total_s,
                    client_cores,
                    i,
                    args.policy == "centralized" or args.decoded,
                    args.draft_ms,
                    out,
                ),
            )
            p.start()
            procs.append(p)
    await asyncio.sleep(args.warmup)
    t0 = dataclasses.replace(server.totals)  # a copy: the server keeps adding to its own
    cpu0 = time.process_time()
    sampler = None
    if args.sample_host:
        from wisp_cloud.host_sampler import HostSampler

        sampler = HostSampler().start()
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()  # the event loop's thread: gateway, scheduling and commit (not the forward)
        prof.enable()
    await asyncio.sleep(args.seconds)
    if prof is not None:
        prof.disable()
        prof.dump_stats(str(args.profile))
    if sampler is not None:
        sampler.stop()
        sampler.dump(args.sample_host, f"{args.policy}-{n}")
    t1 = server.totals
    cpu_s = time.process_time() - cpu0  # this process is the server (clients are spawned processes)
    results = [await asyncio.to_thread(out.get) for _ in procs]
    for p in procs:
        p.join()
    await server.stop()
    if server_cores:
        os.sched_setaffinity(0, cpus)
    steps, items = t1.steps - t0.steps, t1.items - t0.items
    fwd, whole = t1.forward_s - t0.forward_s, t1.step_s - t0.step_s
    host = whole - fwd
    rounds = sum(r["rounds"] for r in results)
    row = {
        "sessions": n,
        "steps": steps,
        "batch_mean": items / steps if steps else 0.0,
        "forward_ms_mean": 1e3 * fwd / steps if steps else 0.0,
        "step_ms_mean": 1e3 * whole / steps if steps else 0.0,
        "host_us_per_session_step": 1e6 * host / items if items else float("nan"),
        "device_idle_share": host / whole if whole else float("nan"),
        # the host time's two measured phases, per session-step: the policy's selection and planning, and the
        # commit of the outcomes (tokens, verdicts, the hybrid's and regime's checks)
        "schedule_us_per_session_step": 1e6 * (t1.schedule_s - t0.schedule_s) / items
        if items
        else float("nan"),
        "commit_us_per_session_step": 1e6 * (t1.commit_s - t0.commit_s) / items if items else float("nan"),
        # CPU the server process spent (gateway + engine, every thread) per session-step: unlike the wall-clock
        # host time, other jobs preempting the server do not inflate it.
        "server_cpu_us_per_session_step": 1e6 * cpu_s / items if items else float("nan"),
        "rounds": rounds,
        # a speculative round's wait at the server, sent → verdict (ms; over the clients' whole run, warm-up
        # included): a step and a half on average if it rides the next step after its arrival
        "round_wait_ms_mean": 1e3 * sum(r["waited_s"] for r in results) / max(1, rounds),
        "client_errors": sum(r["errors"] for r in results),
    }
    print(
        f"N={n:5d}  steps={steps:5d}  batch={row['batch_mean']:7.1f}  step={row['step_ms_mean']:7.2f} ms  "
        f"forward={row['forward_ms_mean']:6.2f} ms  host={row['host_us_per_session_step']:6.1f} µs/session/step  "
        f"(schedule {row['schedule_us_per_session_step']:.1f}, commit {row['commit_us_per_session_step']:.1f})  "
        f"idle={row['device_idle_share']:.2f}  cpu={row['server_cpu_us_per_session_step']:6.1f} µs/session/step  "
        f"round wait={row['round_wait_ms_mean']:.1f} ms",
        flush=True,
    )
    return row


def _plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    xs = [r["sessions"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(xs, [r["host_us_per_session_step"] for r in rows], "o-", label="host µs / session / step")
    ax.axhline(15, color="gray", ls="--", label="goal: 15 µs at N = 512")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent sessions (N)")
    ax.set_ylabel("µs per session per step")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["device_idle_share"] for r in rows], "s:", color="C1", label="device idle share")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("share of each step the device idles")
    a = data["args"]
    ax.set_title(
        f"WISP host path ({a['policy']} policy, FakeBackend {a['base_ms']} ms/step, k={a['k']}, α={a['alpha']})\n"
        f"{data['machine']}, {data['date']}",
        fontsize=9,
    )
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description="Host µs per session per step of the real gateway + engine.")
    ap.add_argument("--sessions", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    ap.add_argument("--policy", default="wisp", choices=["fifo", "centralized", "sled", "wisp"])
    ap.add_argument("--k", type=int, default=4, help="draft tokens per round (default 4)")
    ap.add_argument("--alpha", type=float, default=0.8, help="per-token draft acceptance (default 0.8)")
    ap.add_argument(
        "--base-ms", type=float, default=10.0, help="fake forward: fixed ms per step (default 10)"
    )
    ap.add_argument(
        "--per-token-us", type=float, default=0.0, help="fake forward: µs per new token (default 0)"
    )
    ap.add_argument(
        "--decoded",
        action="store_true",
        help="sessions open in centralized mode under any --policy (the server decodes them, as the regime does)",
    )
    ap.add_argument(
        "--regime-centralized",
        action="store_true",
        help="--policy wisp with its regime held centralized: sessions open speculative and are moved to server "
        "decoding at their first verdict",
    )
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument(
        "--draft-ms",
        type=float,
        default=0.0,
        help="each device drafts this long before sending a round (default 0: back to back)",
    )
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument(
        "--no-tune-runtime",
        action="store_true",
        help="keep Python's GC and GIL switch interval (wisp serve tunes them)",
    )
    ap.add_argument("--procs", type=int, default=2, help="client processes (default 2)")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds before the window (default 5)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window (default 10)")
    ap.add_argument("--machine", default=f"dev VM ({os.cpu_count()} cores, {platform.machine()})")
    ap.add_argument(
        "--profile", type=Path, default=None, help="write cProfile stats of the measured window (event loop)"
    )
    ap.add_argument(
        "--sample-host",
        type=Path,
        metavar="DIR",
        help="write the server's sampled thread stacks over the window to DIR (wisp_cloud/host_sampler.py)",
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results/host_path/host_path.json"))
    ap.add_argument("--plot", action="store_true", help="also write a PNG beside the JSON")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    rows = [asyncio.run(_measure(args, n)) for n in args.sessions]
    data = {
        "benchmark": "host_path",
        "machine": args.machine,
        "date": date.today().isoformat(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    if args.plot:
        _plot(data, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
