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
from collections import deque
from dataclasses import dataclass, field


def _pct(values: list[float] | deque[float], q: float) -> float:
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
class _Totals:
    """Running sums over every finished session (exact, however many were kept for percentiles)."""

    sessions: int = 0
    judged: int = 0
    attained: int = 0
    tokens: int = 0
    tokens_attained: int = 0
    misses: int = 0
    wasted_ms: float = 0.0

    def add(self, r: SessionRecord) -> None:
        self.sessions += 1
        self.misses += r.misses
        self.wasted_ms += r.wasted_ms
        if r.first_token is not None:
            self.judged += 1
            self.tokens += r.tokens
            if r.attained:
                self.attained += 1
                self.tokens_attained += r.tokens


@dataclass
class SLOMetrics:
    """Collects events; `summary(now)` gives the numbers for /metrics and --json stats.

    Counts, attainment and goodput are exact over every session; the percentiles (TTFT, TPOT, verify latency,
    inflation) are over the most recent `max_finished` sessions and `max_samples` rounds (rolling windows), so a
    long-running server's bookkeeping and its per-second summary stay bounded. None keeps everything (the
    benchmark and the simulator judge whole runs).
    """

    started: float = 0.0
    max_finished: int | None = None
    max_samples: int | None = 100_000
    sessions: dict[str, SessionRecord] = field(default_factory=dict)
    refused: int = 0
    finished: deque[SessionRecord] = field(init=False)
    inflation: deque[float] = field(init=False)
    verify_latency: deque[float] = field(init=False)
    totals: _Totals = field(default_factory=_Totals, init=False)

    def __post_init__(self) -> None:
        self.finished = deque(maxlen=self.max_finished)
        self.inflation = deque(maxlen=self.max_samples)
        self.verify_latency = deque(maxlen=self.max_samples)

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
        self.verify_latency.append(latency_s)  # rolling windows: the oldest samples make room
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
            self.totals.add(rec)
        return rec

    def summary(self, now: float, include_live: bool = False) -> dict[str, float]:
        live = list(self.sessions.values()) if include_live else []
        t = _Totals()
        for r in live:
            t.add(r)
        done = self.totals
        n_judged, n_ok = done.judged + t.judged, done.attained + t.attained
        recs = [*self.finished, *live]  # the percentile window
        judged = [r for r in recs if r.first_token is not None]
        window = max(now - self.started, 1e-9)
        ttfts = [r.ttft_s for r in judged if r.ttft_s is not None]
        tpots = [r.tpot_s for r in judged if r.tokens >= 2]
        return {
            "sessions": float(done.sessions + t.sessions),
            "refused": float(self.refused),
            "attained": float(n_ok),
            "attainment": n_ok / n_judged if n_judged else 1.0,
            "goodput_tok_s": (done.tokens_attained + t.tokens_attained) / window,
            "throughput_tok_s": (done.tokens + t.tokens) / window,
            "ttft_p50_ms": 1000 * _pct(ttfts, 50),
            "ttft_p99_ms": 1000 * _pct(ttfts, 99),
            "tpot_p50_ms": 1000 * _pct(tpots, 50),
            "tpot_p99_ms": 1000 * _pct(tpots, 99),
            "verify_p50_ms": 1000 * _pct(self.verify_latency, 50),
            "verify_p99_ms": 1000 * _pct(self.verify_latency, 99),
            "inflation_mean": sum(self.inflation) / len(self.inflation) if self.inflation else 1.0,
            "inflation_p99": _pct(self.inflation, 99) if self.inflation else 1.0,
            "round_misses": float(done.misses + t.misses),
            "wasted_ms": done.wasted_ms + t.wasted_ms,
        }
