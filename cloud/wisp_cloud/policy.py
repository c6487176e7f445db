"""Batch policies: which waiting jobs go into the next forward pass.

The server calls `select` once per loop iteration with every waiting job (oldest first) and runs what comes
back as one ragged batch; `observe` sees each finished batch (so an estimator can refine itself online), and
`wait_hint_ms` fills the Verdict's hint of how long the session's next round will wait. `admit` is the hook for
admission control. The scheduling issue adds `wisp`, `sled` and `centralized` policies next to `fifo` here.

What a policy sees of each waiting `Job`: its session (SLO, sampling, committed length, mode), kind, draft,
arrival (`enqueued_at`), `started_at`, `cached_len` (refreshed before every `select`), `pending_tokens` and
`cache_miss`. It may set `job.max_tokens` to size a job's next piece (a prefill chunk; the final piece, which
carries the draft, always goes whole), and `job.deadline` / `job.annotations` for its own bookkeeping. The
server then plans each selected job (`WispServer._plan`), trims the batch to the KV budget, runs it, and calls
`observe` with the `BatchStats` (the estimator's training data).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # keep `wisp serve --help`-time imports free of torch
    from wisp_cloud.backends.base import BatchStats
    from wisp_cloud.jobs import Job
    from wisp_cloud.sessions import Session


class Policy(Protocol):
    name: str

    def select(self, waiting: list[Job], max_batch: int, now: float) -> list[Job]:
        """The jobs for the next batch (a non-empty subset of `waiting` when it is non-empty)."""
        ...

    def observe(self, stats: BatchStats, jobs: list[Job]) -> None:
        """A batch ran: its shape and timing, and the jobs it served."""
        ...

    def wait_hint_ms(self, session: Session, queued: int) -> float:
        """Expected wait (queue + model time) for this session's next round."""
        ...

    def admit(self, session_count: int, queued: int) -> bool:
        """Whether a new session may open now (False -> `overloaded`)."""
        ...


class FifoPolicy:
    """Everything waiting, oldest first, up to `max_batch`. No SLO awareness."""

    name = "fifo"

    def __init__(self, ema: float = 0.2) -> None:
        self._ema = ema
        self.batch_s = 0.0  # running mean forward time of a batch

    def select(self, waiting: list[Job], max_batch: int, now: float) -> list[Job]:
        return sorted(waiting, key=lambda j: j.enqueued_at)[:max_batch]

    def observe(self, stats: BatchStats, jobs: list[Job]) -> None:
        self.batch_s = (
            stats.forward_s
            if self.batch_s == 0
            else (1 - self._ema) * self.batch_s + self._ema * stats.forward_s
        )

    def wait_hint_ms(self, session: Session, queued: int) -> float:
        return 1000.0 * self.batch_s

    def admit(self, session_count: int, queued: int) -> bool:
        return True


POLICIES: dict[str, type] = {"fifo": FifoPolicy}


def make_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r} (have: {', '.join(POLICIES)})")
    return POLICIES[name]()
