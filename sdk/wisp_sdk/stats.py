"""Per-round and per-generation statistics recorded by the edge (docs/architecture.md, "Stats every round").

wasted_ms is the drafting the device did for nothing: the forward passes that produced draft tokens which were
then rejected, dropped or discarded (the first token's logits come from feeding the committed context, which
any decoder must do, so that time never counts as waste), plus the time spent idle waiting for a verdict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RoundStats:
    round: int
    drafted: int  # draft tokens sent for verification
    accepted: int
    committed: int  # tokens this round committed (accepted + the verifier's token), after local stop rules
    dropped: int = 0  # drafted but withheld (predicted rejection)
    ahead: int = 0  # drafted ahead while the verdict was in flight
    ahead_used: int = 0  # of those, reused by the next round
    draft_ms: float = 0.0  # drafting before the round was sent (feeding committed tokens included)
    wait_ms: float = 0.0  # round sent -> verdict received
    idle_ms: float = 0.0  # part of wait_ms not spent drafting ahead
    wasted_ms: float = 0.0
    queue_ms: float = 0.0  # server-reported
    verify_ms: float = 0.0  # server-reported
    wait_hint_ms: float = 0.0  # server's predicted wait for the next round
    price_ms: float = 0.0  # server's price of one verified token at this verdict
    unverified: int = 0  # sent draft tokens the server did not verify (the tail did not pay)
    resent: bool = False  # re-sent after a reconnect
    siblings: int = 0  # sibling tokens sent (token trees)
    sibling: bool = False  # the verdict committed one of them

    @property
    def wasted_tokens(self) -> int:
        return self.drafted - self.accepted + self.dropped + (self.ahead - self.ahead_used)


@dataclass
class GenerationStats:
    mode: str = "speculative"
    controller: str = ""
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    reconnects: int = 0
    reopened: int = 0  # times the server had lost the session and it was rebuilt from the committed context
    refused: int = 0  # Opens refused with `overloaded` and retried (another replica, behind a balancer)
    switches: int = 0  # times the server moved the session between speculative rounds and its own decoding
    finish_reason: str = ""
    rounds: list[RoundStats] = field(default_factory=list)
    # deliveries of new tokens (the first token's included), the gap from the first to the next, and the longest
    deliveries: int = 0
    first_gap_ms: float = 0.0
    max_gap_ms: float = 0.0

    @property
    def tpot_ms(self) -> float:
        """Time per output token after the first."""
        return (self.total_ms - self.ttft_ms) / (self.new_tokens - 1) if self.new_tokens > 1 else 0.0

    @property
    def drafted(self) -> int:
        return sum(r.drafted for r in self.rounds)

    @property
    def accepted(self) -> int:
        return sum(r.accepted for r in self.rounds)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        return self.accepted / len(self.rounds) if self.rounds else 0.0

    @property
    def wasted_ms(self) -> float:
        return sum(r.wasted_ms for r in self.rounds)

    @property
    def wasted_tokens(self) -> int:
        return sum(r.wasted_tokens for r in self.rounds)

    @property
    def draft_ms(self) -> float:
        return sum(r.draft_ms for r in self.rounds)

    def to_dict(self, rounds: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode,
            "controller": self.controller,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "rounds_count": len(self.rounds),
            "drafted": self.drafted,
            "accepted": self.accepted,
            "mean_accepted_per_round": round(self.mean_accepted, 4),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "ttft_ms": round(self.ttft_ms, 3),
            "tpot_ms": round(self.tpot_ms, 3),
            "total_ms": round(self.total_ms, 3),
            "draft_ms": round(self.draft_ms, 3),
            "wasted_ms": round(self.wasted_ms, 3),
            "deliveries": self.deliveries,
            "first_gap_ms": round(self.first_gap_ms, 3),
            "max_gap_ms": round(self.max_gap_ms, 3),
            "wasted_tokens": self.wasted_tokens,
            "reconnects": self.reconnects,
            "reopened": self.reopened,
            "refused": self.refused,
            "finish_reason": self.finish_reason,
        }
        if rounds:
            out["rounds"] = [asdict(r) for r in self.rounds]
        return out

    def summary(self) -> str:
        return (
            f"tokens={self.new_tokens} rounds={len(self.rounds)} mean_accepted={self.mean_accepted:.2f} "
            f"acceptance={self.acceptance_rate:.1%} ttft={self.ttft_ms:.1f}ms tpot={self.tpot_ms:.1f}ms "
            f"wasted_draft={self.wasted_ms:.1f}ms ({self.wasted_tokens} tokens) finish={self.finish_reason}"
        )


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats
    finish_reason: str

    def to_dict(self, rounds: bool = True) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "stats": self.stats.to_dict(rounds=rounds)}
