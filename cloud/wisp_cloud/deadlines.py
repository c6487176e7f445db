"""SLO -> deadlines: when each request of a session must be answered for the session to meet its SLO.

All times are seconds on the server's clock (whatever clock the caller injects). A deadline is the time by
which the answer must *reach the device*; the scheduler subtracts the predicted verify time and the downlink
time from it to get a request's slack.

The rule (docs/scheduling.md, "Deadlines"):

* **Prefill / first token.** `deadline = t_open + ttft − uplink`, where `t_open` is when the `Open` arrived
  and `uplink` the one-way network estimate (the device's TTFT clock started before the frame arrived).
* **Each round** (and each centralized decode step). A round drafted k tokens is expected to commit
  `E(k, α) = 1 + α + … + α^k = (1 − α^{k+1}) / (1 − α)` tokens (accepted prefix + the target's token), capped
  by the tokens the session still may generate; α is the session's running per-token acceptance rate.
  Its own budget is `tpot × E` measured from the *anchor*, the time the previous answer was sent (so the
  device's draft time and the network count, as they do for the user):

      own      = anchor + tpot × E
      cumul    = t_first + tpot × (committed_after_first + E)       # the session's whole-run TPOT budget
      deadline = own + min(max(0, cumul − own), bank_rounds × tpot × E)

  A session that ran ahead of its SLO has banked time and gets a later deadline (at most `bank_rounds` rounds'
  worth, so a fast session cannot hoard slack); a session that is behind still gets its own round's budget, so
  one slow round never makes every later round hopeless.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def expected_committed(k: int, alpha: float, cap: int | None = None) -> float:
    """Expected tokens a round of k draft tokens commits: Σ_{i=0..k} α^i (the +1 is the target's token)."""
    k = max(int(k), 0)
    a = min(max(float(alpha), 0.0), 1.0)
    e = float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)
    if cap is not None:
        e = min(e, float(max(cap, 1)))
    return e


MIN_ROUNDS = 4  # rounds before a session's own tokens-per-round stands for it (admission)


@dataclass
class AcceptanceStats:
    """Running per-token acceptance rate α: accepted draft tokens ÷ draft tokens *tried* (the first rejected one
    counts as a try, the ones after it do not), with a prior of `prior_n` tries at rate `prior`, and an
    exponential forgetting so that α follows the text (code vs prose)."""

    prior: float = 0.7
    prior_n: float = 4.0
    decay: float = 0.98
    accepted: float = 0.0
    tried: float = 0.0
    rounds: float = 0.0  # decayed like the others
    committed: float = 0.0  # tokens committed by those rounds (accepted + the target's own)
    n_rounds: int = 0

    @property
    def alpha(self) -> float:
        return (self.accepted + self.prior * self.prior_n) / (self.tried + self.prior_n)

    @property
    def measured_alpha(self) -> float | None:
        """α once a draft token was tried, else None: before that it is the prior alone, and callers (admission,
        the hybrid rule, verify_len) fall back to their own defaults rather than trust it."""
        return self.alpha if self.tried > 0 else None

    @property
    def tokens_per_round(self) -> float | None:
        """Measured tokens a round commits, or None before `MIN_ROUNDS` rounds (one short round would make a new
        session look hopeless). An adaptive controller stops drafting before likely rejections, so its rounds
        commit more than the i.i.d. Σα^i of its mean draft length."""
        return self.committed / self.rounds if self.n_rounds >= MIN_ROUNDS else None

    def update(self, drafted: int, accepted: int) -> None:
        self.rounds = self.rounds * self.decay + 1
        self.n_rounds += 1
        self.committed = self.committed * self.decay + accepted + 1
        if drafted <= 0:
            return
        tried = accepted + (1 if accepted < drafted else 0)
        self.accepted = self.accepted * self.decay + accepted
        self.tried = self.tried * self.decay + tried


@dataclass
class SessionDeadlines:
    """Per-session deadline bookkeeping; the server (or simulator) tells it what happened and when."""

    ttft_s: float
    tpot_s: float
    t_open: float
    max_new_tokens: int | None = None
    uplink_s: float = 0.0
    bank_rounds: float = 2.0
    t_first: float | None = None  # when the first token was sent
    anchor: float | None = None  # when the last answer (first token, verdict, decode token) was sent
    committed: int = 0  # tokens generated after the first one
    acceptance: AcceptanceStats = field(default_factory=AcceptanceStats)

    @classmethod
    def from_slo(cls, slo, t_open: float, max_new_tokens: int | None = None, uplink_s: float = 0.0, **kw):
        """From a `wisp_sdk.protocol.SLO` (ms) to seconds."""
        return cls(
            ttft_s=slo.ttft_ms / 1000.0,
            tpot_s=slo.tpot_ms / 1000.0,
            t_open=t_open,
            max_new_tokens=max_new_tokens,
            uplink_s=uplink_s,
            **kw,
        )

    # ---- deadlines ----
    def prefill_deadline(self) -> float:
        return self.t_open + self.ttft_s - self.uplink_s

    @property
    def remaining(self) -> int | None:
        if self.max_new_tokens is None:
            return None
        return max(self.max_new_tokens - 1 - self.committed, 1)

    def expected_tokens(self, k: int) -> float:
        return expected_committed(k, self.acceptance.alpha, self.remaining)

    def round_deadline(self, k: int, now: float | None = None) -> float:
        """Deadline of a round of k draft tokens (k=0: a centralized decode step)."""
        e = self.expected_tokens(k)
        anchor = self.anchor if self.anchor is not None else (now if now is not None else self.t_open)
        own = anchor + self.tpot_s * e
        if self.t_first is None:
            return own
        cumul = self.t_first + self.tpot_s * (self.committed + e)
        bank = min(max(0.0, cumul - own), self.bank_rounds * self.tpot_s * e)
        return own + bank

    # ---- events ----
    def on_first_token(self, sent_at: float) -> None:
        self.t_first = sent_at
        self.anchor = sent_at

    def on_round(self, drafted: int, accepted: int, sent_at: float) -> None:
        """A verdict (accepted + 1 tokens committed) or a decode step (drafted=0, accepted=0) was sent."""
        self.acceptance.update(drafted, accepted)
        self.committed += accepted + 1
        self.anchor = sent_at
        if self.t_first is None:
            self.t_first = sent_at
