"""Controllers, the rejection predictor and the sans-I/O session core (no model, no network)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from wisp_sdk.controllers import Action, FixedK, LinkState, Wisp, gpu_draft_len, make_controller
from wisp_sdk.draft_runner import DraftToken
from wisp_sdk.errors import ProtocolError
from wisp_sdk.predictor import FEATURES, RejectionPredictor, features, simulate_rounds
from wisp_sdk.protocol import Opened, Resumed, Switch, Tokens, Verdict
from wisp_sdk.session import GenerationRequest, Session


def tok(token: int = 5, top1: float = 0.9, ent: float = 0.3) -> DraftToken:
    return DraftToken(token=token, prob=top1, entropy=ent, top1=top1)


def run_round(ctl, stream: list[DraftToken], link: LinkState | None = None) -> tuple[int, int]:
    """Drive a controller over a stream of proposals; returns (sent, dropped)."""
    ctl.start_round(link or LinkState())
    kept = []
    for t in stream:
        action = ctl.step([*kept, t])
        if action is Action.DROP:
            return len(kept), 1
        kept.append(t)
        if action is Action.SEND:
            break
    return len(kept), 0


def test_fixed_k_drafts_exactly_k():
    assert run_round(FixedK(4), [tok()] * 10) == (4, 0)
    assert run_round(FixedK(4), [tok()] * 10, LinkState(max_draft=2)) == (2, 0)
    assert run_round(FixedK(0), [tok()] * 10) == (0, 1)


def test_wisp_stops_before_predicted_rejection():
    ctl = Wisp(rate0=0.8)
    stream = [tok(top1=0.95, ent=0.2)] * 3 + [tok(top1=0.05, ent=4.5)] + [tok()] * 10
    sent, dropped = run_round(ctl, stream, LinkState(rtt_ms=50, draft_ms=1))
    assert (sent, dropped) == (3, 1)


def test_wisp_drafts_more_when_a_long_wait_is_coming():
    stream = [tok(top1=0.8, ent=0.8)] * 40
    fast, _ = run_round(
        Wisp(max_draft=32), stream, LinkState(rtt_ms=1, wait_hint_ms=0, verify_ms=1, draft_ms=2, max_draft=32)
    )
    slow, _ = run_round(
        Wisp(max_draft=32),
        stream,
        LinkState(rtt_ms=80, wait_hint_ms=300, verify_ms=10, draft_ms=2, max_draft=32),
    )
    assert 1 <= fast < slow


def test_wisp_running_rate_follows_verdicts():
    ctl = Wisp(rate0=0.6)
    for _ in range(20):
        ctl.observe([tok()] * 4, 0)
    low = ctl.rate
    for _ in range(20):
        ctl.observe([tok()] * 4, 4)
    assert low < 0.2 and ctl.rate > 0.9


def test_tree_siblings_follow_the_price_and_the_learned_hit_rate():
    """Siblings on an idle GPU up to the tree, none at a price above their expected saving, none for FixedK."""
    ctl = Wisp(tree=3)
    ctl.start_round(LinkState(rtt_ms=20.0, draft_ms=5.0))
    toks = [tok(token=i, top1=0.6, ent=1.5) for i in range(5)]
    for i in range(len(toks)):
        assert ctl.step(toks[: i + 1]) is not Action.DROP
    assert ctl.siblings(toks) == 3  # price 0: every position up to the tree
    ctl.tree = 5
    ctl._survive = [0.99, 0.98, 0.97, 0.3, 0.1]  # confident, then a likely rejection at the fourth token
    assert ctl.siblings(toks) == 5  # the early siblings, worth little alone, open the way to the later ones
    ctl._survive = [0.999, 0.998, 0.997, 0.996, 0.995]  # nothing likely to be rejected: no sibling pays
    assert ctl.siblings(toks) == 0
    ctl.tree, ctl._survive = 3, [0.6, 0.36, 0.2, 0.1, 0.05]
    ctl.link.price_ms = 1e6
    assert ctl.siblings(toks) == 0  # no sibling is worth a second of others' GPU time
    ctl.link.price_ms = 0.0
    for _ in range(200):
        ctl.observe_sibling(False)
    assert ctl.sibling_hit < 1e-6 and ctl.siblings(toks) == 0  # a draft whose second choice never hits
    fixed = FixedK(4)
    fixed.start_round(LinkState())
    assert fixed.tree == 0 and fixed.siblings(toks) == 0


def test_make_controller():
    assert isinstance(make_controller("fixed:8"), FixedK) and make_controller("fixed:8").k == 8
    assert isinstance(make_controller("wisp"), Wisp)
    assert make_controller("wisp+ahead").draft_ahead > 0
    assert make_controller("wisp+cap").round_overhead > 0 and make_controller("wisp").round_overhead == 0
    assert make_controller("wisp+tree").tree > 0 and make_controller("wisp").tree == 0
    with pytest.raises(ValueError):
        make_controller("nope")


def test_predictor_fit_recovers_a_known_model():
    rng = np.random.default_rng(0)
    n = 6000
    x = np.column_stack(
        [rng.uniform(0, 1, n), rng.uniform(0, 5, n), np.log1p(rng.integers(0, 8, n)), rng.uniform(0, 1, n)]
    )
    w_true, b_true = np.array([4.0, -0.8, -0.3, 1.5]), -1.0
    y = (rng.uniform(0, 1, n) < 1 / (1 + np.exp(-(x @ w_true + b_true)))).astype(float)
    pred = RejectionPredictor.fit(x, y, l2=0.0)
    np.testing.assert_allclose(pred.weights, w_true, atol=0.35)
    assert pred.bias == pytest.approx(b_true, abs=0.35)
    again = RejectionPredictor.from_dict(json.loads(json.dumps(pred.to_dict())))
    assert again.p_accept(0.9, 0.5, 2, 0.7) == pytest.approx(pred.p_accept(0.9, 0.5, 2, 0.7))
    assert list(pred.to_dict()["features"]) == list(FEATURES)


def test_default_predictor_is_sane():
    p = RejectionPredictor()
    assert p.p_accept(0.95, 0.2, 0, 0.7) > 0.8
    assert p.p_accept(0.1, 4.0, 0, 0.7) < 0.3


def test_simulate_rounds_labels_only_what_a_verifier_would_judge():
    agree = np.array([1, 1, 0, 1, 1, 1, 1, 0, 0], dtype=bool)
    x, y = simulate_rounds(np.full(9, 0.5), np.ones(9), agree, max_k=3)
    # round 1: pos 0,1 agree, pos 2 rejected -> correction at index 2; round 2 from 3: 3,4,5 all accepted
    # (+ bonus at 6); round 3 from 7: rejected at once -> correction; round 4 from 8: rejected.
    assert y.tolist() == [1, 1, 0, 1, 1, 1, 0, 0]
    assert [round(float(np.expm1(v))) for v in x[:, 2]] == [0, 1, 2, 0, 1, 2, 0, 0]
    np.testing.assert_allclose(x[0], features(0.5, 1.0, 0, 0.6))


# ---- session core ----


class _Tok:
    """Stand-in tokenizer: token i decodes to chr(ord('a') + i % 26); 2 is EOS (decodes to nothing)."""

    special_ids = {2}

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if i == 2 else chr(ord("a") + i % 26) for i in ids)


def make_session(**kw) -> Session:
    req = GenerationRequest(prompt_ids=[10, 11, 12], **kw)
    return Session(req, eos_token_ids=[2], tokenizer=_Tok())  # type: ignore[arg-type]


SID = "ab" * 16


def open_session(s: Session, first: int = 3) -> str:
    return s.on_opened(Opened(session_id=SID, committed_len=4, next_token=first))


def test_session_commits_verdicts_once():
    s = make_session(max_new_tokens=50)
    assert open_session(s) == "d"
    rnd = s.make_round([tok(4), tok(5), tok(6)])
    assert rnd.round == 1 and rnd.committed_len == 4 and rnd.draft_ids == [4, 5, 6] and rnd.q_ids is None
    v = Verdict(session_id=SID, round=1, committed_len=7, accepted=2, next_token=9)
    assert s.on_verdict(v) == (2, "efj")
    assert s.on_verdict(v) is None  # the cached answer to a re-sent round changes nothing
    assert s.generated == [3, 4, 5, 9]
    s.make_round([tok(1)])
    with pytest.raises(ProtocolError):
        s.on_verdict(Verdict(session_id=SID, round=2, committed_len=99, accepted=1, next_token=1))


def test_session_stops_at_eos_and_max_tokens():
    s = make_session(max_new_tokens=50)
    open_session(s)
    s.make_round([tok(4), tok(2), tok(6)])
    s.on_verdict(Verdict(session_id=SID, round=1, committed_len=7, accepted=2, next_token=9))
    assert s.done and s.finish_reason == "eos" and s.generated == [3, 4, 2]
    s = make_session(max_new_tokens=3)
    open_session(s)
    s.make_round([tok(4), tok(5), tok(6)])
    s.on_verdict(Verdict(session_id=SID, round=1, committed_len=8, accepted=3, next_token=7))
    assert s.done and s.finish_reason == "length" and s.generated == [3, 4, 5]


def test_session_stop_strings_are_never_streamed():
    s = make_session(max_new_tokens=50, stop=["fgh"])
    deltas = [open_session(s)]  # "d"
    s.make_round([tok(4), tok(5)])  # "e", "f"
    deltas.append(
        s.on_verdict(Verdict(session_id=SID, round=1, committed_len=7, accepted=2, next_token=6))[1]
    )
    assert "".join(deltas) == "de"  # "fg" is held back: it may become the stop string
    s.make_round([tok(7), tok(8)])  # "h": stop string complete
    deltas.append(
        s.on_verdict(Verdict(session_id=SID, round=2, committed_len=10, accepted=2, next_token=9))[1]
    )
    assert s.done and s.finish_reason == "stop" and s.text == "de" and "".join(deltas) == "de"


def test_session_resume_decisions():
    s = make_session(max_new_tokens=50)
    open_session(s)
    rnd = s.make_round([tok(4)])
    assert s.on_resumed(Resumed(session_id=SID, committed_len=4, last_round=0)) is rnd  # never arrived
    assert (
        s.on_resumed(Resumed(session_id=SID, committed_len=6, last_round=1)) is rnd
    )  # applied: cached verdict
    assert s.on_resumed(Resumed(session_id=SID, committed_len=9, last_round=5)) is False  # diverged
    reopen = s.lost()
    assert reopen.committed_ids == [3] and reopen.prompt_ids == [10, 11, 12] and s.inflight is None
    assert s.on_opened(Opened(session_id="cd" * 16, committed_len=5, next_token=8)) == "i"
    assert s.generated == [3, 8] and s.round_no == 0


def test_session_centralized_tokens_skip_duplicates():
    s = make_session(max_new_tokens=50, mode="centralized")
    open_session(s)
    s.on_tokens(Tokens(session_id=SID, tokens=[4], committed_len=5))
    s.on_tokens(Tokens(session_id=SID, tokens=[3, 4, 5], committed_len=6))  # re-sent after a resume
    assert s.generated == [3, 4, 5]


# ---- server price, truncated verification, mode switches ----


def test_wisp_higher_price_gives_shorter_drafts():
    stream = [tok(top1=0.85, ent=0.6)] * 40
    lengths = []
    for price in (0.0, 2.0, 8.0, 40.0):
        link = LinkState(rtt_ms=30, wait_hint_ms=20, verify_ms=10, draft_ms=2, max_draft=32, price_ms=price)
        lengths.append(run_round(Wisp(max_draft=32), stream, link)[0])
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1] >= 1


def test_wisp_price_zero_is_the_unpriced_rule():
    stream = [tok(top1=0.8, ent=0.8)] * 40
    base = LinkState(rtt_ms=40, wait_hint_ms=10, verify_ms=5, draft_ms=3, max_draft=32)
    priced = LinkState(rtt_ms=40, wait_hint_ms=10, verify_ms=5, draft_ms=3, max_draft=32, price_ms=0.0)
    assert run_round(Wisp(max_draft=32), stream, base) == run_round(Wisp(max_draft=32), stream, priced)
    # the rule itself, at price 0: keep drafting while S * rate * T > c * E
    ctl = Wisp(max_draft=32, rate0=0.6)
    sent, _ = run_round(ctl, stream, base)
    s, e, t = ctl._survive, 1.0 + sum(ctl._survive), sent * 3 + 40 + 10 + 5
    assert not s[-1] * ctl.rate * t > 3 * e


def test_gpu_draft_len_minimizes_gpu_cost_per_committed_token():
    """(k + 1 + overhead) / E(k): brute force over k agrees; a higher acceptance or a dearer round drafts longer."""

    def cost(k: int, alpha: float, overhead: float) -> float:
        return (k + 1 + overhead) / sum(alpha**i for i in range(k + 1))

    for alpha in (0.3, 0.6, 0.8, 0.9, 0.97):
        for overhead in (0.0, 0.5, 1.5, 4.0):
            best = min(cost(k, alpha, overhead) for k in range(1, 17))
            got = cost(gpu_draft_len(alpha, overhead, 16), alpha, overhead)
            assert got == pytest.approx(best), (alpha, overhead)
    assert gpu_draft_len(0.6, 1.5, 16) < gpu_draft_len(0.9, 1.5, 16) < gpu_draft_len(0.97, 1.5, 16)
    assert gpu_draft_len(0.9, 0.5, 16) < gpu_draft_len(0.9, 4.0, 16)
    assert gpu_draft_len(0.99, 4.0, 3) == 3  # the cap


def test_wisp_gpu_cap_stops_at_the_cheapest_draft_on_a_loaded_server():
    """With the GPU cap, a loaded server (positive price) gets the draft length that costs its GPU least per
    committed token at the session's running rate, even where a long hinted wait would buy a longer one; an idle
    server (price 0) gets the plain rule."""
    stream = [tok(top1=0.95, ent=0.2)] * 40
    loaded = LinkState(rtt_ms=20, wait_hint_ms=300, verify_ms=30, draft_ms=5, max_draft=32, price_ms=4.0)
    idle = LinkState(rtt_ms=20, wait_hint_ms=300, verify_ms=30, draft_ms=5, max_draft=32, price_ms=0.0)
    plain, _ = run_round(Wisp(max_draft=32, rate0=0.8), stream, loaded)
    ctl = Wisp(max_draft=32, rate0=0.8, round_overhead=1.5)
    capped, _ = run_round(ctl, stream, loaded)
    assert capped == gpu_draft_len(0.8, 1.5, 32) < plain
    assert run_round(Wisp(max_draft=32, rate0=0.8, round_overhead=1.5), stream, idle) == run_round(
        Wisp(max_draft=32, rate0=0.8), stream, idle
    )


def test_session_truncated_verdict_commits_the_verified_prefix():
    s = make_session(max_new_tokens=50)
    open_session(s)
    s.make_round([tok(4), tok(5), tok(6), tok(7)])
    # the server verified two of four, accepted both, and added its own token at the truncation point
    v = Verdict(session_id=SID, round=1, committed_len=7, accepted=2, next_token=9, unverified=2)
    assert s.on_verdict(v) == (2, "efj")
    assert s.generated == [3, 4, 5, 9]
    s.make_round([tok(4), tok(5)])
    with pytest.raises(ProtocolError):  # accepted past the verified prefix
        s.on_verdict(
            Verdict(session_id=SID, round=2, committed_len=10, accepted=2, next_token=1, unverified=1)
        )


def test_session_switches_to_centralized_and_back():
    s = make_session(max_new_tokens=50)
    open_session(s)
    s.make_round([tok(4)])
    s.on_verdict(Verdict(session_id=SID, round=1, committed_len=6, accepted=1, next_token=5, centralize=True))
    assert s.mode == "centralized" and s.inflight is None
    s.on_tokens(Tokens(session_id=SID, tokens=[6], committed_len=7))
    with pytest.raises(ProtocolError):
        s.on_switch(Switch(session_id=SID, committed_len=99))
    s.on_switch(Switch(session_id=SID, committed_len=7))
    assert s.mode == "speculative" and s.switches == 2
    assert s.make_round([tok(7)]).round == 2 and s.generated == [3, 4, 5, 6]


def test_session_resume_picks_up_a_switch_made_while_the_link_was_down():
    s = make_session(max_new_tokens=50)
    open_session(s)
    s.make_round([tok(4)])  # its verdict (centralize) and a Tokens frame were lost
    assert s.on_resumed(Resumed(session_id=SID, committed_len=8, last_round=1, mode="centralized")) is None
    assert s.mode == "centralized" and s.inflight is None and s.behind
    # the switch counts as if its verdict had come: the next generation offers to start on the server
    assert s.switches == 1 and s.moved_to_server and not s.handed_to_edge
    s.on_tokens(Tokens(session_id=SID, tokens=[3, 4, 5, 6, 7], committed_len=8))
    assert not s.behind and s.generated == [3, 4, 5, 6, 7]
    # handed back while the link was down again
    assert s.on_resumed(Resumed(session_id=SID, committed_len=8, last_round=1, mode="speculative")) is None
    assert s.mode == "speculative" and s.switches == 2 and s.handed_to_edge
