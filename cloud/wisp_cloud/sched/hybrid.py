"""The load-adaptive hybrid: when to move a session from edge speculation to server-side decoding, and back.

A speculative round of k drafts commits E(k, α) tokens but makes the GPU verify k + 1, so each committed token
carries (k + 1)/E − 1 tokens of wasted verify compute; a centralized token carries none. But a decoded token is an
item of its own in its step, and an item costs beyond its tokens (per-sequence work, and the host work an online
fit holds): r tokens' worth (`VerifyPrice.item_ratio`), which a round shares among its E tokens. Priced at the
verify price (pricing.py), a session's speculation costs the others, beyond what decoding it would,

    cost = (waste − r × (1 − 1/E)) × price_ms / tpot_ms,   waste = (k + 1) / E(k, α) − 1

GPU ms per ms of its own TPOT budget (negative: decoding would cost more). Without r (before session 11) the rule
took a decoded token for free: on an H200 (7B, Mac mini, ShareGPT, run 39, r ≈ 2.3) it moved 1460 sessions to the
server in three points, and WISP served 647 devices against 714 without the hybrid. The rule, with hysteresis so a session does not flap:
  - speculative → centralized when cost > `enter` (0.5), judged only after `min_rounds` rounds (α is measured),
    but not when the session meets its TPOT on the edge and a server-side decode step would not (decoded in steps
    longer than its TPOT it would miss at every token: `meets_only_on_the_edge`);
  - centralized → speculative when cost < `leave` (0.25) at the session's last measured α and k, after at least
    `dwell_tokens` (16) decoded tokens, doubled for each round trip the session already made (up to 2^`backoff`):
    the load fell, drafting pays again. The doubling is measured, not designed: on an H200 (7B, TPOT 30 and 60,
    docs/benchmarks.md runs 19–20) a 7B arm logged 1570–2341 moves to the server and 1037–1570 back, every return
    costing the device a catch-up feed of the decoded tokens (16 × 5.2 ms on a Mac-mini-class draft) and, for a
    session still too slow, another slow round before it moves again.
So drafts that are mostly rejected, on a GPU whose steps are shared by many sessions, go to the server, where
every token is useful work; when the load falls they come back to the edge, which costs the GPU less per token.

A second reason, independent of load: a session whose link and device are too slow for its SLO. A round takes
round_ms (the device's time between a verdict and its next round, plus the server's) and commits E tokens. If
round_ms / E > `slow_margin` (0.8) × tpot_ms while a server-side decode step would take less than `faster` (0.8) ×
round_ms / E, speculation is at risk of missing the SLO and decoding is clearly faster: the session moves. The
second margin is measured (H200 runs 42-43, 7B, Jetson, code10): with a decode merely faster, sessions at ≈ 52 ms a
token, inside a 60 ms SLO, moved for a decode of ≈ 45 (425 `slow` moves in a point), each then an item of its own in
every step, and WISP served 736-963 devices against 916-1060 without the hybrid. It is
judged from its first measured round (at `prior_alpha` until α is measured) and comes back only when that no
longer holds (the session's last measured round time is kept while it is decoded centrally). Simulated, phone-
class drafts (60 ms/token) at a 60 ms SLO went from 14–21 devices to the centralized capacity (docs/benchmarks.md).
`every` is a test hook: switch every N rounds / decoded tokens regardless of load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from wisp_cloud.deadlines import expected_committed
from wisp_cloud.estimator import ItemShape

# A decode's predicted wait plus step (`round_and_decode_ms`) in steps, where steps run back to back: half a step
# for the running one, then its own.
DECODE_WAIT_STEPS = 1.5


class Why(str, Enum):
    """Why the rule moved a session (the server logs it with each `session_switch`)."""

    regime = "regime"  # the regime decodes the whole fleet
    slow = "slow"  # too slow for its SLO on its link and device
    cost = "cost"  # its rejected drafts cost the others more than decoding it would
    hook = "hook"  # the `every` test hook
    edge = "edge"  # back to the edge: drafting pays again
    probe = "probe"  # a regime probe that started decoded goes to the edge to measure (sched/regime.py)


def _per_token_ms(k: int, alpha: float, round_ms: float) -> float:
    """A speculative session's ms a committed token: its round's time over the tokens a round commits."""
    return round_ms / max(expected_committed(max(0, k), alpha), 1.0)


class SwitchInputs(NamedTuple):
    """The hybrid rule's per-session inputs (positional, in the order `to_centralized` takes them)."""

    k: int
    alpha: float | None  # measured acceptance, None before
    price_ms: float
    tpot_ms: float
    round_ms: float | None  # None until the device time is measured (round_and_decode_ms)
    decode_ms: float | None
    item_ratio: float = 0.0  # VerifyPrice.item_ratio


@dataclass(frozen=True)
class HybridRule:
    enter: float = 0.5
    leave: float = 0.25
    min_rounds: int = 4
    dwell_tokens: int = 16
    # the dwell doubles per round trip already made, at most 2^backoff times (16 -> 256 tokens)
    backoff: int = 4
    every: int = 0  # test hook: > 0 switches every `every` rounds and back every `every` decoded tokens
    slow_margin: float = 0.8
    faster: float = 0.8  # ... and a decode must take less than this share of the rounds' time a token
    # α assumed by the too-slow test before it is measured: the real Qwen2.5-Coder 0.5B→1.5B pair's per-token
    # acceptance on ShareGPT (0.794, docs/workloads.md), the lower of the two public workloads
    prior_alpha: float = 0.794

    @staticmethod
    def cost(k: int, alpha: float, price_ms: float, tpot_ms: float, item_ratio: float = 0.0) -> float:
        """GPU ms a committed token of speculation costs the others beyond a decoded one's, per ms of the
        session's TPOT budget: rejected drafts' compute, less the items decoding would add (module docstring)."""
        e = max(expected_committed(max(0, k), alpha), 1.0)
        waste = (k + 1) / e - 1.0 - max(0.0, item_ratio) * (1.0 - 1.0 / e)
        return waste * max(0.0, price_ms) / max(tpot_ms, 1e-6)

    def too_slow(
        self, k: int, alpha: float, tpot_ms: float, round_ms: float | None, decode_ms: float | None
    ) -> bool:
        """Speculation is at risk of the TPOT SLO on this link and device, and a server-side decode step is clearly
        faster (it need not meet the SLO itself: where neither can, decoding is what centralized serving would do)."""
        if round_ms is None or decode_ms is None:
            return False
        per_token = _per_token_ms(k, alpha, round_ms)
        return per_token > self.slow_margin * tpot_ms and decode_ms < self.faster * per_token

    @staticmethod
    def meets_only_on_the_edge(
        k: int, alpha: float, tpot_ms: float, round_ms: float | None, decode_ms: float | None
    ) -> bool:
        """Does the session meet its TPOT by speculation, where decoded it would miss at every token (it gets one
        a step, and `decode_ms` is a decode's wait plus its step, ≈ 1.5 steps back to back)? Then moving it saves
        the others GPU time but serves no more sessions (H200 run 54, 32B, Jetson, code10: speculative steps of
        60-90 ms at TPOT 60 and 199 such moves a point)."""
        if round_ms is None or decode_ms is None:
            return False
        return _per_token_ms(k, alpha, round_ms) <= tpot_ms < decode_ms / DECODE_WAIT_STEPS

    def to_centralized(
        self,
        rounds: int,
        k: int,
        alpha: float | None,
        price_ms: float,
        tpot_ms: float,
        round_ms: float | None = None,
        decode_ms: float | None = None,
        item_ratio: float = 0.0,
    ) -> Why | None:
        """After a verdict: switch this speculative session to server-side decoding? Why, or None: it stays."""
        if self.every:
            return Why.hook if rounds >= self.every else None
        # Too slow is judged from the first measured round, at the prior α until α is measured: a session that
        # waits `min_rounds` slow rounds has already spent most of a short generation's TPOT budget.
        if self.too_slow(k, self.prior_alpha if alpha is None else alpha, tpot_ms, round_ms, decode_ms):
            return Why.slow
        if alpha is None or rounds < self.min_rounds:
            return None
        if self.cost(k, alpha, price_ms, tpot_ms, item_ratio) <= self.enter:
            return None
        return None if self.meets_only_on_the_edge(k, alpha, tpot_ms, round_ms, decode_ms) else Why.cost

    def moves(
        self,
        to_edge: bool,
        steps: int,
        trips: int,
        decode_all: bool,
        probing: bool,
        inputs: Callable[[], SwitchInputs],
    ) -> Why | None:
        """The whole decision, as the server (commit.py) and the simulator take it, with its reason (None: the
        session stays): after a verdict (`to_edge` False) or a decode step of a moved session (True), `steps`
        rounds / decoded tokens since the last switch.
        The regime's comes first (sched/regime.py): while it decodes the whole fleet (`decode_all`) no session goes
        back to the edge and every speculative one moves, a probe excepted. `probing`: after a verdict, a probe
        still measuring; after a decode step, a probe that started decoded (its device's offer) and has not been
        to the edge yet: it goes there once it has dwelt, at any load, as any such session does in the speculative
        regime, so that its first round does not wait for its draft's prompt prefill. Cheap refusals come
        before `inputs` (k, α, price, TPOT, round and decode ms), which costs two wait-hint predictions, and a
        decoded session asks after every step."""
        if to_edge:
            if not self.dwelt(steps, trips):
                return None
            if probing:
                return Why.probe
            if decode_all:
                return None
            return Why.edge if self.to_speculative(steps, *inputs(), trips=trips) else None
        if decode_all and not probing:
            return Why.regime
        return self.to_centralized(steps, *inputs())

    def dwelt(self, decoded: int, trips: int = 0) -> bool:
        """Has a decoded session stayed long enough to be handed back (`to_speculative` asks this first)?"""
        if self.every:
            return decoded >= self.every
        return decoded >= self.dwell_tokens << min(max(0, trips), self.backoff)

    def to_speculative(
        self,
        decoded: int,
        k: int,
        alpha: float | None,
        price_ms: float,
        tpot_ms: float,
        round_ms: float | None = None,
        decode_ms: float | None = None,
        item_ratio: float = 0.0,
        trips: int = 0,
    ) -> bool:
        """After a decode step: hand this (switched) session back to the edge? `trips`: how many times it already
        went to the server and came back."""
        if not self.dwelt(decoded, trips):
            return False
        if self.every:
            return True
        if alpha is None:
            return True
        return self.cost(k, alpha, price_ms, tpot_ms, item_ratio) < self.leave and not self.too_slow(
            k, alpha, tpot_ms, round_ms, decode_ms
        )


def round_and_decode_ms(
    think_s: float | None, hint: Callable[[ItemShape], float], k: int, context_len: int
) -> tuple[float | None, float | None]:
    """The too-slow test's inputs, as the server (commit.py) and the simulator feed them: a speculative round's
    time (the device's measured time between an answer and its next round, plus the predicted wait and verify
    step) and a server-side decode's, both in ms; (None, None) until the device time is measured. `hint`:
    predicted seconds from an item's arrival to its answer (the scheduler's wait hint).

    A decode is charged the same queueing wait as a round, although a decoded session rides the very next step.
    Measured (H200, 7B, TPOT 30, docs/benchmarks.md run 19): charging it one step only moved many more
    sessions to the server and attainment at 224 devices fell from 0.92 (no hybrid) to 0.39: the wait errs on
    the side of keeping sessions on the edge."""
    if think_s is None:
        return None, None
    verify_ms = 1000.0 * hint(ItemShape(k + 1, context_len))
    return 1000.0 * think_s + verify_ms, 1000.0 * hint(ItemShape(1, context_len))
