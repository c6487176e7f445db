"""Jobs: one session's pending model work (open, verify round, centralized decode step), as the scheduler sees it.

A job can take several batches: a long context is prefilled a chunk per batch (so a prefill cannot stall
everyone else's verification), and only the last batch carries the draft and asks for logits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from wisp_cloud.acceptance import SparseQ
from wisp_cloud.estimator import ItemShape
from wisp_cloud.sched.requests import Request
from wisp_cloud.sessions import Session


class JobKind(str, Enum):
    open = "open"  # prefill the context, commit the target's first token
    round = "round"  # verify a draft
    decode = "decode"  # centralized mode: one autoregressive step


@dataclass(eq=False)
class Job:
    session: Session
    kind: JobKind
    round: int = 0
    draft: list[int] = field(default_factory=list)
    q: list[SparseQ] | None = None  # draft distributions on their support (sampling rounds)
    unverified: int = 0  # draft tokens the client sent past `draft` (truncated: the tail did not pay)
    siblings: list[int] = field(default_factory=list)  # an alternative to each of draft[:len(siblings)]
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # when its first batch began (queue wait ends)
    forward_s: float = 0.0  # model time spent on it so far, over all its batches
    batches: int = 0
    # Refreshed by the loop right before each `Policy.select`: tokens of this session in the backend's KV.
    cached_len: int = 0
    # Set from the scheduler's slot to size this job's next piece (a prefill chunk); None = the server default.
    max_tokens: int | None = None
    # Absolute monotonic time the answer must reach the device by (deadlines.py); None without an SLO.
    deadline: float | None = None
    # The scheduler's view of this job (kept across selections, so a chunked prefill keeps its pacing).
    request: Request | None = None
    # Of the batch it last ran in: the estimator's item shape, and whether that piece carried the draft.
    ran_shape: ItemShape | None = None
    final: bool = True

    @property
    def context_tokens(self) -> int:
        return self.session.committed_len

    @property
    def pending_tokens(self) -> int:
        """Tokens this job still has to push through the model (context not in the KV, plus the draft)."""
        return self.session.committed_len - self.cached_len + len(self.draft) + len(self.siblings)

    @property
    def cache_miss(self) -> bool:
        """Its context is not (fully) cached: evicted, new, or mid-prefill. Costs a prefill before verifying."""
        return self.session.committed_len - self.cached_len > 1


def request_of(job: Job) -> Request:
    """The scheduler's view of a job: its tokens still to push, context, deadline and expected commit."""
    s = job.session
    pending = max(1, job.pending_tokens)
    ctx_pending = s.committed_len - job.cached_len
    # two pending context tokens is still a verify: a committed sibling and its target token (acceptance.py)
    if job.kind == JobKind.open or ctx_pending > 2:
        kind = "prefill"
    else:
        kind = "verify" if job.kind == JobKind.round else "decode"
    d = s.deadlines
    expected = 1.0
    if job.kind == JobKind.round:
        expected = d.expected_tokens(len(job.draft)) if d is not None else float(len(job.draft) + 1)
    deadline = job.deadline if job.deadline is not None else job.enqueued_at + s.slo.tpot_ms / 1000.0
    return Request(
        s.id,
        kind,  # type: ignore[arg-type]
        new_tokens=pending,
        context_len=job.cached_len,
        deadline=deadline,
        arrival=job.enqueued_at,
        expected_tokens=expected,
        cache_miss=job.cache_miss and job.kind != JobKind.open and job.cached_len == 0,
        payload=job,
        tenant=s.owner,
    )
