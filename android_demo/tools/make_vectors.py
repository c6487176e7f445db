"""Write the shared test vectors that keep the Kotlin client and `wisp_sdk` from drifting.

    .venv/bin/python android_demo/tools/make_vectors.py            # rewrite core/src/test/resources/vectors.json
    .venv/bin/python android_demo/tools/make_vectors.py --check    # exit 1 if the committed file is stale

Everything here comes from the Python implementation: frames encoded by `wisp_sdk.protocol` (JSON text, and hex of
the binary Round/Verdict) with their decoded fields, frames it rejects, the rejection predictor's outputs, `Wisp`
controller decisions over scripted rounds, and the sparse sampling distribution q. The Kotlin unit tests
(`VectorsTest.kt`) decode and re-encode every frame and replay every decision. tests/test_android_vectors.py checks
that regenerating gives the committed file.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "android_demo" / "core" / "src" / "test" / "resources" / "vectors.json"

SID = "0123456789abcdef0123456789abcdef"
SID2 = "ffeeddccbbaa99887766554433221100"


def _json_vectors(p) -> list[dict]:
    limits = p.Limits(
        max_frame_bytes=1 << 20, max_draft_len=32, max_context_len=32768, max_sessions_per_token=8
    )
    client = [
        ("hello", p.Hello(tokenizer_fingerprint="sha256:" + "ab" * 32)),
        ("hello_auth", p.Hello(tokenizer_fingerprint="sha256:00", auth_token="t0k", client="wisp-android")),
        ("open_default", p.Open(prompt_ids=[1, 2, 3])),
        (
            "open_full",
            p.Open(
                prompt_ids=[151644, 872, 198],
                committed_ids=[40, 41],
                max_new_tokens=64,
                sampling=p.SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=1234),
                slo=p.SLO(ttft_ms=500.0, tpot_ms=50.5),
                mode="centralized",
                stop_token_ids=[151645, 151643],
            ),
        ),
        (
            "open_start_on_server",  # a speculative session offering to start decoded by the server
            p.Open(
                prompt_ids=[151644, 872, 198],
                max_new_tokens=32,
                stop_token_ids=[151645],
                start_on_server=True,
            ),
        ),
        ("resume", p.Resume(session_id=SID)),
        ("close", p.Close(session_id=SID)),
    ]
    server = [
        ("welcome", p.Welcome(limits=limits, policy="wisp")),
        ("opened", p.Opened(session_id=SID, committed_len=4, next_token=17)),
        (
            "opened_full",
            p.Opened(
                session_id=SID2,
                committed_len=9,
                next_token=2,
                done=True,
                prefill_ms=12.5,
                queue_ms=3.25,
                wait_hint_ms=40.0,
            ),
        ),
        # the server took the start_on_server offer (or the session was opened centralized): Tokens follow
        ("opened_central", p.Opened(session_id=SID, committed_len=4, next_token=17, mode="centralized")),
        ("resumed", p.Resumed(session_id=SID, committed_len=42, last_round=7)),
        ("resumed_central", p.Resumed(session_id=SID, committed_len=42, last_round=7, mode="centralized")),
        ("switch", p.Switch(session_id=SID, committed_len=50)),
        ("tokens", p.Tokens(session_id=SID, tokens=[5, 6, 7], committed_len=12)),
        ("tokens_done", p.Tokens(session_id=SID, tokens=[], committed_len=12, done=True)),
        ("closed", p.Closed(session_id=SID)),
        ("error_min", p.Error(code=p.ErrorCode.bad_request, message="round 3 has stale committed_len")),
        (
            "error_full",
            p.Error(code=p.ErrorCode.unknown_session, message="no such session", session_id=SID, round=3),
        ),
    ]
    server += [(f"error_{c.value}", p.Error(code=c, message=c.value)) for c in p.ErrorCode]
    out = []
    for direction, items in (("client", client), ("server", server)):
        for name, msg in items:
            text = p.encode(msg)
            back = p.decode_client(text) if direction == "client" else p.decode_server(text)
            assert back == msg, name
            out.append({"name": name, "direction": direction, "text": text, "fields": json.loads(text)})
    return out


def _round_vectors(p) -> list[dict]:
    rng = np.random.default_rng(7)
    q_ids, q_probs = [], []
    for n in (3, 1, 5):
        ids = rng.choice(1000, size=n, replace=False).tolist()
        probs = rng.dirichlet(np.ones(n)).astype(np.float32)
        q_ids.append(ids)
        q_probs.append([float(x) for x in probs])
    rounds = [
        ("greedy", p.Round(session_id=SID, round=1, committed_len=5, draft_ids=[10, 11, 12, 13])),
        ("empty", p.Round(session_id=SID, round=2, committed_len=10, draft_ids=[])),
        (
            "big_ids",
            p.Round(session_id=SID2, round=2_000_000_000, committed_len=131072, draft_ids=[151643, 0, -1]),
        ),
        (
            "sparse",
            p.Round(
                session_id=SID,
                round=3,
                committed_len=7,
                draft_ids=[q[0] for q in q_ids],
                q_ids=q_ids,
                q_probs=q_probs,
            ),
        ),
    ]
    out = []
    for name, msg in rounds:
        data = p.encode_round(msg)
        back = p.decode_round(data)
        assert back == msg, name
        out.append({"name": name, "hex": data.hex(), "fields": back.model_dump(mode="json")})
    return out


def _verdict_vectors(p) -> list[dict]:
    verdicts = [
        ("accept_some", p.Verdict(session_id=SID, round=1, committed_len=8, accepted=2, next_token=99)),
        (
            "done_timed",
            p.Verdict(
                session_id=SID2,
                round=12,
                committed_len=300,
                accepted=0,
                next_token=151645,
                done=True,
                queue_ms=1.5,
                verify_ms=7.25,
                wait_hint_ms=33.3,
            ),
        ),
        (
            "all_accepted",
            p.Verdict(session_id=SID, round=65535, committed_len=70000, accepted=16, next_token=-2),
        ),
        (
            "priced_truncated_centralize",
            p.Verdict(
                session_id=SID2,
                round=3,
                committed_len=40,
                accepted=1,
                next_token=77,
                price_ms=12.5,
                unverified=3,
                centralize=True,
            ),
        ),
        (
            "launch_hint",
            p.Verdict(
                session_id=SID, round=7, committed_len=90, accepted=3, next_token=5, price_ms=2.5, launch_in_ms=18.75
            ),
        ),
        (
            "draft_cap",
            p.Verdict(
                session_id=SID2, round=9, committed_len=120, accepted=2, next_token=11, price_ms=4.0, draft_cap=3
            ),
        ),
    ]
    out = []
    for name, msg in verdicts:
        data = p.encode_verdict(msg)
        back = p.decode_verdict(data)  # floats come back as their float32 values
        out.append({"name": name, "hex": data.hex(), "fields": back.model_dump(mode="json")})
    return out


def _invalid_vectors(p) -> list[dict]:
    good_round = p.encode_round(p.Round(session_id=SID, round=1, committed_len=5, draft_ids=[1, 2]))
    good_verdict = p.encode_verdict(
        p.Verdict(session_id=SID, round=1, committed_len=8, accepted=2, next_token=9)
    )
    sparse = bytearray(good_round)
    sparse[2] = p.FLAG_SPARSE_Q  # claims a distribution it does not carry
    cases = [
        ("round", "short_header", good_round[:3]),
        ("round", "wrong_version", bytes([1]) + good_round[1:]),  # a v1 frame
        ("round", "wrong_kind", good_verdict),
        ("round", "truncated_fixed", good_round[:20]),
        ("round", "truncated_tokens", good_round[:-1]),
        ("round", "trailing_bytes", good_round + b"\x00"),
        ("round", "sparse_missing_q", bytes(sparse)),
        ("verdict", "too_short", good_verdict[:-1]),
        ("verdict", "too_long", good_verdict + b"\x00"),
        ("verdict", "wrong_kind", good_round),
        ("verdict", "wrong_version", bytes([1]) + good_verdict[1:]),  # a v1 frame
        ("verdict", "v2_frame", bytes([2]) + good_verdict[1:-4]),  # a v2 frame: no launch_in_ms
        ("verdict", "v3_frame", bytes([3]) + good_verdict[1:-6] + good_verdict[-4:]),  # a v3 frame: no draft_cap
        ("verdict", "v4_frame", bytes([4]) + good_verdict[1:]),  # a v4 frame (no token trees): same layout
        ("verdict", "negative_launch", good_verdict[:-4] + struct.pack("<f", -1.0)),
    ]
    out = []
    for kind, name, data in cases:
        decode = p.decode_round if kind == "round" else p.decode_verdict
        try:
            decode(data)
        except p.ProtocolError as exc:
            out.append({"name": name, "kind": kind, "hex": data.hex(), "error": str(exc)})
        else:
            raise AssertionError(f"{name} decoded")
    texts = [
        ("not_json", "{nope"),
        ("unknown_type", '{"type":"bogus"}'),
        ("missing_field", '{"type":"opened","session_id":"' + SID + '","committed_len":3}'),
        ("bad_code", '{"type":"error","code":"teapot","message":"x"}'),
    ]
    for name, text in texts:
        try:
            p.decode_server(text)
        except p.ProtocolError as exc:
            out.append({"name": name, "kind": "server_text", "text": text, "error": str(exc)})
        else:
            raise AssertionError(f"{name} decoded")
    return out


def _predictor_vectors() -> dict:
    from wisp_sdk.predictor import DEFAULT_PREDICTOR, RejectionPredictor

    pred = RejectionPredictor()
    cases = []
    for top1 in (0.05, 0.3, 0.6, 0.95, 1.0):
        for ent in (0.0, 0.7, 2.5):
            for pos in (0, 1, 5, 15):
                for rate in (0.0, 0.6, 1.0):
                    cases.append(
                        {
                            "top1": top1,
                            "entropy": ent,
                            "position": pos,
                            "rate": rate,
                            "p": pred.p_accept(top1, ent, pos, rate),
                        }
                    )
    calibrated = {
        "kind": "logistic",
        "features": DEFAULT_PREDICTOR["features"],
        "weights": [6.0, -1.0, -0.3, 2.0],
        "bias": -3.5,
        "source": "calibrated",
    }
    cal = RejectionPredictor.from_dict(calibrated)
    cal_cases = [
        {"top1": t, "entropy": e, "position": k, "rate": r, "p": cal.p_accept(t, e, k, r)}
        for t, e, k, r in ((0.9, 0.4, 0, 0.7), (0.5, 1.5, 3, 0.4), (0.99, 0.05, 10, 0.95))
    ]
    return {
        "default": DEFAULT_PREDICTOR,
        "cases": cases,
        "calibrated": calibrated,
        "calibrated_cases": cal_cases,
    }


def _controller_vectors() -> list[dict]:
    """Scripted sessions: per round, the tokens the draft proposes; record the controller's actions."""
    from wisp_sdk.controllers import Action, FixedK, LinkState, Wisp
    from wisp_sdk.draft_runner import DraftToken

    rng = np.random.default_rng(11)
    links = {
        "fast_link": dict(rtt_ms=1.0, wait_hint_ms=0.0, verify_ms=2.0, draft_ms=5.0, max_draft=16),
        "slow_link": dict(rtt_ms=120.0, wait_hint_ms=0.0, verify_ms=8.0, draft_ms=4.0, max_draft=16),
        "slow_link_priced": dict(
            rtt_ms=120.0, wait_hint_ms=0.0, verify_ms=8.0, draft_ms=4.0, max_draft=16, price_ms=30.0
        ),
        "long_wait": dict(rtt_ms=30.0, wait_hint_ms=400.0, verify_ms=8.0, draft_ms=4.0, max_draft=16),
        "server_cap": dict(rtt_ms=200.0, wait_hint_ms=100.0, verify_ms=8.0, draft_ms=2.0, max_draft=3),
        # launch hints (docs/scheduling.md §11): room for many tokens before the launch; a launch close ahead
        "aligned": dict(
            rtt_ms=10.0, wait_hint_ms=0.0, verify_ms=8.0, draft_ms=4.0, max_draft=16, price_ms=1.0, launch_in_ms=40.0
        ),
        "aligned_tight": dict(
            rtt_ms=10.0, wait_hint_ms=0.0, verify_ms=8.0, draft_ms=4.0, max_draft=16, price_ms=3.0, launch_in_ms=12.0
        ),
    }
    sessions = []
    for ctl_name in ("wisp", "fixed:4", "fixed:0"):
        for link_name, link_kw in links.items():
            ctl = Wisp() if ctl_name == "wisp" else FixedK(int(ctl_name.split(":")[1]))
            rounds = []
            for _ in range(6):
                # Confident stretches with an occasional flat distribution, as real drafts look.
                proposals = []
                for _ in range(20):
                    if rng.random() < 0.25:
                        top1 = float(rng.uniform(0.1, 0.5))
                        ent = float(rng.uniform(1.0, 3.0))
                    else:
                        top1 = float(rng.uniform(0.7, 1.0))
                        ent = float(rng.uniform(0.0, 0.8))
                    proposals.append({"top1": top1, "entropy": ent})
                ctl.start_round(LinkState(**link_kw))
                kept: list = []
                actions = []
                for prop in proposals:
                    tok = DraftToken(
                        token=len(kept), prob=prop["top1"], entropy=prop["entropy"], top1=prop["top1"]
                    )
                    action = ctl.step(kept + [tok])
                    actions.append(action.value)
                    if action is Action.DROP:
                        break
                    kept.append(tok)
                    if action is Action.SEND:
                        break
                accepted = int(rng.integers(0, len(kept) + 1))
                ctl.observe(kept, accepted)
                rounds.append(
                    {
                        "proposals": proposals[: len(actions)],
                        "actions": actions,
                        "accepted": accepted,
                        "rate_after": getattr(ctl, "rate", None),
                    }
                )
            sessions.append(
                {"name": f"{ctl_name}/{link_name}", "controller": ctl_name, "link": link_kw, "rounds": rounds}
            )
    return sessions


def _sparse_q_vectors() -> list[dict]:
    from wisp_sdk.sampling import entropy, softmax, sparse_q

    rng = np.random.default_rng(3)
    out = []
    for vocab, temp, top_k, top_p in (
        (50, 1.0, 0, 1.0),
        (200, 0.7, 0, 0.9),
        (200, 1.3, 10, 1.0),
        (100, 0.5, 20, 0.8),
        (30, 2.0, 0, 0.5),
    ):
        logits = (rng.standard_normal(vocab) * 3.0).astype(np.float32)
        q = sparse_q(logits, temp, top_k, top_p)
        plain = softmax(logits)
        out.append(
            {
                "logits": [float(x) for x in logits],
                "temperature": temp,
                "top_k": top_k,
                "top_p": top_p,
                "ids": [int(i) for i in q.ids],
                "probs": [float(x) for x in q.probs],
                "top1": float(plain.max()),
                "argmax": int(np.argmax(plain)),
                "entropy": entropy(plain),
            }
        )
    return out


def build() -> dict:
    from wisp_sdk import protocol as p
    from wisp_sdk.errors import ProtocolError

    p.ProtocolError = ProtocolError  # convenience for the helpers above
    return {
        "generated_by": "android_demo/tools/make_vectors.py (from wisp_sdk; do not edit)",
        "protocol_version": p.PROTOCOL_VERSION,
        "subprotocol": p.SUBPROTOCOL,
        "json": _json_vectors(p),
        "round": _round_vectors(p),
        "verdict": _verdict_vectors(p),
        "invalid": _invalid_vectors(p),
        "predictor": _predictor_vectors(),
        "controller": _controller_vectors(),
        "sparse_q": _sparse_q_vectors(),
    }


def render() -> str:
    return json.dumps(build(), indent=1, sort_keys=False) + "\n"


# Floats computed by numpy/libm (predictor probabilities, sparse q, entropies) may move in the last bit between
# numpy releases or across languages; integers, strings, bytes (hex) and wire frames must match exactly.
REL_TOL = 1e-12


def differences(expected: object, actual: object, where: str = "$", rel: float = REL_TOL) -> list[str]:
    """Where two decoded vector files differ: exact for everything but floats, floats within `rel` (relative)."""
    if (
        isinstance(expected, bool)
        or isinstance(actual, bool)
        or not (isinstance(expected, float) or isinstance(actual, float))
    ):
        if isinstance(expected, dict) and isinstance(actual, dict):
            if expected.keys() != actual.keys():
                return [f"{where}: keys {sorted(expected)} != {sorted(actual)}"]
            return [d for k in expected for d in differences(expected[k], actual[k], f"{where}.{k}", rel)]
        if isinstance(expected, list) and isinstance(actual, list):
            if len(expected) != len(actual):
                return [f"{where}: length {len(expected)} != {len(actual)}"]
            return [
                d
                for i, (a, b) in enumerate(zip(expected, actual))
                for d in differences(a, b, f"{where}[{i}]", rel)
            ]
        return (
            []
            if expected == actual and type(expected) is type(actual)
            else [f"{where}: {expected!r} != {actual!r}"]
        )
    if not isinstance(expected, int | float) or not isinstance(actual, int | float):
        return [f"{where}: {expected!r} != {actual!r}"]
    if abs(expected - actual) <= rel * max(1.0, abs(expected), abs(actual)):
        return []
    return [f"{where}: {expected!r} != {actual!r} (beyond {rel:g} relative)"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    text = render()
    diffs = (
        differences(json.loads(args.out.read_text()), json.loads(text)) if args.out.is_file() else ["missing"]
    )
    if args.check:
        if diffs:
            print(
                f"{args.out} is stale ({diffs[0]}): run {Path(__file__).relative_to(ROOT)}", file=sys.stderr
            )
            return 1
        print(f"{args.out.relative_to(ROOT)} is up to date (floats within {REL_TOL:g} relative)")
        return 0
    if not diffs:  # equal within tolerance: keep the committed bytes, so the file never churns
        print(f"{args.out.relative_to(ROOT)} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
