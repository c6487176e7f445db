"""What a load balancer adds to a verify round: the same rounds straight to a replica and through the balancer.

One client, sequential rounds (an idle server), sessions alternating between the two URLs so drift in the
server's speed hits both alike. Per round it records the client's wall time and the server's own
queue + verify time (from the verdict); their difference is the wire part, where the balancer's hop shows.
Reported: p50 of both, direct and balanced, and the balancer's added p50 (balanced − direct, wire part).

    python bench/balancer_latency.py --direct ws://127.0.0.1:P0 --balanced ws://127.0.0.1:P \
        --cookie WISPSRV=r0 --bundle DRAFT_BUNDLE --rounds 400 --k 4 --out runs/balancer-latency.json

`--cookie` pins the balanced rounds to the replica `--direct` names (HAProxy's affinity cookie), so both sides
measure the same replica. The draft tokens are arbitrary (a verify costs the same whatever is accepted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from wisp_sdk.bundle import load_manifest
from wisp_sdk.protocol import (
    SUBPROTOCOL,
    Close,
    Hello,
    Open,
    Opened,
    Round,
    Verdict,
    Welcome,
    decode_server,
    encode,
)

PROMPT = [11, 42, 7, 99, 23, 5, 61, 17]


async def session(
    url: str, fingerprint: str, k: int, most: int, cookie: str | None
) -> list[tuple[float, float]]:
    """One session's rounds: (wall ms, server queue + verify ms) each."""
    from websockets.asyncio.client import connect

    headers = {"Cookie": cookie} if cookie else None
    out: list[tuple[float, float]] = []
    async with connect(url, subprotocols=[SUBPROTOCOL], additional_headers=headers, max_size=None) as ws:  # type: ignore[list-item]
        await ws.send(encode(Hello(tokenizer_fingerprint=fingerprint, client="balancer_latency")))
        welcome = decode_server(await ws.recv())
        assert isinstance(welcome, Welcome), welcome
        room = welcome.limits.max_context_len - len(PROMPT) - 1
        await ws.send(encode(Open(prompt_ids=PROMPT, max_new_tokens=min(room, 4096))))
        opened = decode_server(await ws.recv())
        assert isinstance(opened, Opened), opened
        committed, token = opened.committed_len, opened.next_token
        for r in range(1, most + 1):
            if committed + k + 1 > welcome.limits.max_context_len:
                break
            msg = Round(session_id=opened.session_id, round=r, committed_len=committed, draft_ids=[token] * k)
            t0 = time.perf_counter()
            await ws.send(encode(msg))
            verdict = decode_server(await ws.recv())
            wall = (time.perf_counter() - t0) * 1000.0
            assert isinstance(verdict, Verdict), verdict
            out.append((wall, verdict.queue_ms + verdict.verify_ms))
            committed, token = verdict.committed_len, verdict.next_token
            if verdict.done:
                break
        await ws.send(encode(Close(session_id=opened.session_id)))
    return out


def summary(rounds: list[tuple[float, float]]) -> dict[str, float]:
    return {
        "rounds": len(rounds),
        "wall_p50_ms": round(statistics.median(w for w, _ in rounds), 4),
        "server_p50_ms": round(statistics.median(s for _, s in rounds), 4),
        "wire_p50_ms": round(statistics.median(w - s for w, s in rounds), 4),
    }


async def main(args: argparse.Namespace) -> dict:
    fingerprint = load_manifest(Path(args.bundle)).tokenizer_fingerprint
    direct: list[tuple[float, float]] = []
    balanced: list[tuple[float, float]] = []
    for _ in range(args.warmup):
        await session(args.direct, fingerprint, args.k, 8, None)
        await session(args.balanced, fingerprint, args.k, 8, args.cookie)
    while len(direct) < args.rounds or len(balanced) < args.rounds:
        direct += await session(args.direct, fingerprint, args.k, args.per_session, None)
        balanced += await session(args.balanced, fingerprint, args.k, args.per_session, args.cookie)
    d, b = summary(direct), summary(balanced)
    return {
        "k": args.k,
        "direct": d,
        "balanced": b,
        "added_wall_p50_ms": round(b["wall_p50_ms"] - d["wall_p50_ms"], 4),
        "added_wire_p50_ms": round(b["wire_p50_ms"] - d["wire_p50_ms"], 4),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--direct", required=True, help="a replica's ws:// URL")
    p.add_argument("--balanced", required=True, help="the balancer's ws:// URL")
    p.add_argument("--cookie", help="affinity cookie for the balanced side, e.g. WISPSRV=r0")
    p.add_argument("--bundle", required=True, help="draft bundle (its manifest's tokenizer fingerprint)")
    p.add_argument("--rounds", type=int, default=400, help="rounds per side")
    p.add_argument("--per-session", type=int, default=50, help="rounds per session before alternating")
    p.add_argument("--warmup", type=int, default=2, help="short sessions per side first, not counted")
    p.add_argument("--k", type=int, default=4, help="draft tokens per round")
    p.add_argument("--out", help="write the JSON here too")
    a = p.parse_args()
    result = asyncio.run(main(a))
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
