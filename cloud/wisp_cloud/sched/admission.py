"""Admission control: refuse a new session when it would push admitted sessions' SLO attainment below target."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from wisp_cloud.deadlines import expected_committed
from wisp_cloud.estimator import ItemShape, VerifyTimeEstimator


@dataclass
class SessionLoad:
    """What admission needs to know about a session's steady-state demand."""

    session_id: str
    tpot_s: float
    draft_len: int = 4
    context_len: int = 256
    alpha: float | None = None  # per-token acceptance (None: like the others)
    tokens_per_round: float | None = (
        None  # measured tokens committed per round (None: from draft_len and alpha)
    )
    think_s: float | None = None  # device time per round: draft + network (None: like the others)
    ttft_s: float = math.inf
    prompt_len: int = 0


@dataclass
class AdmissionDecision:
    admit: bool
    attainment: float  # predicted fraction of admitted sessions (with the candidate) meeting their TPOT SLO
    reason: str = ""


@dataclass
class AdmissionController:
    """Refuse a new session when the estimator predicts it pushes admitted sessions' attainment below target.

    Steady-state model (docs/scheduling.md, "Admission"): one round per session per cycle; rounds arrive spread
    over the cycle, so batches last T_b = w / (1 − U) at GPU utilisation U (see `cycles`). Session i's cycle is
    max(think_i + 1.5·T_b, G) (its draft and network time, half a batch of queueing on average, its own batch;
    and never faster than the GPU can verify everyone once, G). It meets its SLO when
    cycle_i ≤ tpot_i · E_i, E_i its measured tokens per round (else E(k_i, α_i) = Σα^i). The candidate's first
    token must also fit: G + its prefill ≤ ttft.
    """

    estimator: VerifyTimeEstimator
    target: float = 0.9
    max_batch: int = 64
    default_think_s: float = 0.05
    default_alpha: float = 0.7

    def _profiles(self, loads: Sequence[SessionLoad]) -> list[SessionLoad]:
        """Each load with its think time, draft length and α filled in.

        A speculative session not measured yet (no round, or no verdict) is taken to behave like the median
        measured one, as a whole: its draft length goes with its device time (mixing one session's draft length
        with another's device time mispredicts both).
        """
        known = sorted(
            (s for s in loads if s.think_s is not None and s.alpha is not None and s.draft_len > 0),
            key=lambda s: s.think_s or 0.0,
        )
        rep = known[len(known) // 2] if known else None
        out = []
        for s in loads:
            if s.think_s is not None and (s.alpha is not None or s.draft_len == 0):
                out.append(replace(s, alpha=s.alpha if s.alpha is not None else self.default_alpha))
            elif rep is not None and s.draft_len > 0:
                out.append(
                    replace(
                        s,
                        think_s=rep.think_s,
                        draft_len=rep.draft_len,
                        alpha=rep.alpha,
                        tokens_per_round=rep.tokens_per_round,
                    )
                )
            else:
                think = s.think_s if s.think_s is not None else self.default_think_s
                out.append(
                    replace(s, think_s=think, alpha=s.alpha if s.alpha is not None else self.default_alpha)
                )
        return out

    def gpu_rotation(self, loads: Sequence[SessionLoad]) -> tuple[float, float]:
        """(G, w): GPU seconds to verify one round of every session back to back (in batches of `max_batch`),
        and the fixed cost of one step (a batch of one short round: the weight read, launches)."""
        if not loads:
            return 0.0, 0.0
        shapes = sorted((ItemShape(s.draft_len + 1, s.context_len) for s in loads), key=lambda x: x.context)
        groups = [shapes[i : i + self.max_batch] for i in range(0, len(shapes), self.max_batch)]
        g = sum(self.estimator.predict(grp) for grp in groups)
        w = min(self.estimator.predict([ItemShape(1, shapes[len(shapes) // 2].context)]), g / len(groups))
        return g, w

    def cycles(self, loads: Sequence[SessionLoad]) -> list[float]:
        """Each session's round-trip in steady state (its loads already profiled).

        Rounds do not arrive together: each device sends its next round when its draft is done, and the GPU takes
        whatever waits. With utilisation U = Σ_i c_i / C_i (c_i: the GPU time a round of session i adds on top of
        the fixed step cost w), a batch lasts T_b = w / (1 − U), and a round waits half a batch and rides one:
        C_i = think_i + 1.5·T_b, solved as a fixed point. A batch never exceeds everyone's rounds (T_b ≤ G per
        group), and no session cycles faster than the GPU can verify everyone once (G).
        """
        g, w = self.gpu_rotation(loads)
        n = len(loads)
        marginal = max(g - w * -(-n // self.max_batch), 0.0) / n  # c_i, the same for all
        thinks = [s.think_s or 0.0 for s in loads]
        full = g / -(-n // self.max_batch)  # a batch never holds more than every session's round
        tb = w
        for _ in range(50):
            u = sum(marginal / max(t + 1.5 * tb, g, 1e-9) for t in thinks)
            new = min(w / (1.0 - u) if u < 1.0 else math.inf, full)
            if abs(new - tb) <= 1e-6 * max(tb, 1e-3):
                tb = new
                break
            tb = new
        return [max(t + 1.5 * tb, g) for t in thinks]

    def predict_attainment(self, loads: Sequence[SessionLoad]) -> float:
        if not loads:
            return 1.0
        loads = self._profiles(loads)
        ok = 0
        for s, cycle in zip(loads, self.cycles(loads), strict=True):
            e = s.tokens_per_round or expected_committed(s.draft_len, s.alpha or 0.0)
            ok += cycle <= s.tpot_s * e
        return ok / len(loads)

    def admit(self, candidate: SessionLoad, active: Sequence[SessionLoad]) -> AdmissionDecision:
        loads = [*active, candidate]
        att = self.predict_attainment(loads)
        if att < self.target:
            profiles = self._profiles(loads)
            g, _ = self.gpu_rotation(profiles)
            thinks = sorted(s.think_s or 0.0 for s in profiles)
            return AdmissionDecision(
                False,
                att,
                f"predicted SLO attainment {att:.0%} < target {self.target:.0%} ({len(loads)} sessions, GPU "
                f"rotation {g * 1000:.0f} ms, median device time per round {thinks[len(thinks) // 2] * 1000:.0f} ms)",
            )
        if candidate.prompt_len:
            g, _ = self.gpu_rotation(self._profiles(active))
            prefill = self.estimator.predict([ItemShape(candidate.prompt_len, 0)])
            if g + prefill > candidate.ttft_s:
                return AdmissionDecision(
                    False, att, f"first token predicted in {g + prefill:.3f}s > TTFT SLO"
                )
        return AdmissionDecision(True, att)
