"""SLO accounting: per session TTFT / TPOT / attained, per server goodput, attainment and interference.

Pure and clock-injected, like the scheduler, so the server, `wisp bench` and `wisp simulate` count the same way.

Definitions (docs/scheduling.md, "Metrics"):
  TTFT      first token sent − open received (server side; a client adds its own network time).
  TPOT      (last token time − first token time) ÷ (tokens − 1), over the tokens after the first; 0 when a
            session produced a single token.
  attained  TTFT ≤ slo.ttft and TPOT ≤ slo.tpot, judged when the session ends (a session still running is
            judged on what it did so far by `summary(include_live=True)`).
  goodput   Σ tokens of attained sessions ÷ the measurement window (tokens/s).
  inflation verify latency (queue + forward) ÷ the estimator's solo forward time of the same item: how much
            sharing the GPU with others slowed a round down (1.0 = as if alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    i = min(len(s) - 1, max(0, math.ceil(q / 100.0 * len(s)) - 1))
    return s[i]


@dataclass
class SessionRecord:
    session_id: str
    ttft_slo_s: float
    tpot_slo_s: float
    opened: float
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0
    closed: float | None = None
    rounds: int = 0
    misses: int = 0  # rounds answered after their deadline
    wasted_ms: float = 0.0  # reported by the client (draft time past the first rejection + idle wait)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.opened

    @property
    def tpot_s(self) -> float:
        if self.first_token is None or self.last_token is None or self.tokens < 2:
            return 0.0
        return (self.last_token - self.first_token) / (self.tokens - 1)

    @property
    def attained(self) -> bool:
        ttft = self.ttft_s
        return ttft is not None and ttft <= self.ttft_slo_s + 1e-9 and self.tpot_s <= self.tpot_slo_s + 1e-9


@dataclass
class SLOMetrics:
    """Collects events; `summary(now)` gives the numbers for /metrics and --json stats."""

    started: float = 0.0
    sessions: dict[str, SessionRecord] = field(default_factory=dict)
    finished: list[SessionRecord] = field(default_factory=list)
    refused: int = 0
    inflation: list[float] = field(default_factory=list)
    verify_latency: list[float] = field(default_factory=list)
    max_samples: int = 100_000

    def open(self, session_id: str, ttft_ms: float, tpot_ms: float, now: float) -> SessionRecord:
        rec = SessionRecord(session_id, ttft_ms / 1000.0, tpot_ms / 1000.0, now)
        self.sessions[session_id] = rec
        return rec

    def refuse(self) -> None:
        """A session refused by admission control (`overloaded`)."""
        self.refused += 1

    def tokens(self, session_id: str, n: int, now: float) -> None:
        """`n` tokens were sent to the device at `now` (the first call carries the first token)."""
        rec = self.sessions.get(session_id)
        if rec is None or n <= 0:
            return
        if rec.first_token is None:
            rec.first_token = now
        rec.last_token = now
        rec.tokens += n

    def round(self, session_id: str, latency_s: float, solo_s: float, met: bool) -> None:
        """A verify/decode answered `latency_s` after arrival; alone it would have taken `solo_s`."""
        rec = self.sessions.get(session_id)
        if rec is not None:
            rec.rounds += 1
            rec.misses += not met
        if len(self.verify_latency) < self.max_samples:
            self.verify_latency.append(latency_s)
            if solo_s > 0:
                self.inflation.append(latency_s / solo_s)

    def wasted(self, session_id: str, ms: float) -> None:
        rec = self.sessions.get(session_id)
        if rec is not None:
            rec.wasted_ms += ms

    def close(self, session_id: str, now: float) -> SessionRecord | None:
        rec = self.sessions.pop(session_id, None)
        if rec is not None:
            rec.closed = now
            self.finished.append(rec)
        return rec

    def summary(self, now: float, include_live: bool = False) -> dict[str, float]:
        recs = list(self.finished) + (list(self.sessions.values()) if include_live else [])
        judged = [r for r in recs if r.first_token is not None]
        ok = [r for r in judged if r.attained]
        window = max(now - self.started, 1e-9)
        ttfts = [r.ttft_s for r in judged if r.ttft_s is not None]
        tpots = [r.tpot_s for r in judged if r.tokens >= 2]
        return {
            "sessions": float(len(recs)),
            "refused": float(self.refused),
            "attained": float(len(ok)),
            "attainment": len(ok) / len(judged) if judged else 1.0,
            "goodput_tok_s": sum(r.tokens for r in ok) / window,
            "throughput_tok_s": sum(r.tokens for r in judged) / window,
            "ttft_p50_ms": 1000 * _pct(ttfts, 50),
            "ttft_p99_ms": 1000 * _pct(ttfts, 99),
            "tpot_p50_ms": 1000 * _pct(tpots, 50),
            "tpot_p99_ms": 1000 * _pct(tpots, 99),
            "verify_p50_ms": 1000 * _pct(self.verify_latency, 50),
            "verify_p99_ms": 1000 * _pct(self.verify_latency, 99),
            "inflation_mean": sum(self.inflation) / len(self.inflation) if self.inflation else 1.0,
            "inflation_p99": _pct(self.inflation, 99) if self.inflation else 1.0,
            "round_misses": float(sum(r.misses for r in recs)),
            "wasted_ms": sum(r.wasted_ms for r in recs),
        }
