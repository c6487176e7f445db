"""The load-adaptive hybrid: when to move a session from edge speculation to server-side decoding, and back.

A speculative round of k drafts commits E(k, α) tokens but makes the GPU verify k + 1, so each committed token
carries (k + 1)/E − 1 tokens of wasted verify compute; a centralized token carries none (it pays a share of the
weight read instead, which a busy GPU shares among many sessions). Priced at the verify price (pricing.py), a
session's speculation costs the others

    cost = waste × price_ms / tpot_ms,   waste = (k + 1) / E(k, α) − 1

GPU ms of waste per ms of its own TPOT budget. The rule, with hysteresis so a session does not flap:
  - speculative → centralized when cost > `enter` (0.5), judged only after `min_rounds` rounds (α is measured);
  - centralized → speculative when cost < `leave` (0.25) at the session's last measured α and k, after at least
    `dwell_tokens` (16) decoded tokens: the load fell, drafting pays again.
So drafts that are mostly rejected, on a GPU whose steps are shared by many sessions, go to the server, where
every token is useful work; when the load falls they come back to the edge, which costs the GPU less per token.
`every` is a test hook: switch every N rounds / decoded tokens regardless of load.
"""

from __future__ import annotations

from dataclasses import dataclass

from wisp_cloud.deadlines import expected_committed


@dataclass(frozen=True)
class HybridRule:
    enter: float = 0.5
    leave: float = 0.25
    min_rounds: int = 4
    dwell_tokens: int = 16
    every: int = 0  # test hook: > 0 switches every `every` rounds and back every `every` decoded tokens

    @staticmethod
    def cost(k: int, alpha: float, price_ms: float, tpot_ms: float) -> float:
        """GPU ms wasted on rejected drafts, per ms of the session's TPOT budget, per committed token."""
        e = expected_committed(max(0, k), alpha)
        waste = (k + 1) / max(e, 1.0) - 1.0
        return waste * max(0.0, price_ms) / max(tpot_ms, 1e-6)

    def to_centralized(
        self, rounds: int, k: int, alpha: float | None, price_ms: float, tpot_ms: float
    ) -> bool:
        """After a verdict: switch this speculative session to server-side decoding?"""
        if self.every:
            return rounds >= self.every
        if alpha is None or rounds < self.min_rounds:
            return False
        return self.cost(k, alpha, price_ms, tpot_ms) > self.enter

    def to_speculative(
        self, decoded: int, k: int, alpha: float | None, price_ms: float, tpot_ms: float
    ) -> bool:
        """After a decode step: hand this (switched) session back to the edge?"""
        if self.every:
            return decoded >= self.every
        if decoded < self.dwell_tokens:
            return False
        return alpha is None or self.cost(k, alpha, price_ms, tpot_ms) < self.leave
