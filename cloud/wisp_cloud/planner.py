"""Planning a selected job into the backend's work item, and cutting a proposal at EOS / stop / limits.

Pure functions over a session and the backend's KV lengths: no queue, no sockets. The engine calls `plan` for each
job the scheduler selected, `fit_budget` on the whole plan, and `cut` on each answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from wisp_cloud.backends.base import Backend, ItemResult, WorkItem
from wisp_cloud.estimator import ItemShape
from wisp_cloud.jobs import Job, JobKind
from wisp_cloud.sessions import Session


@dataclass(slots=True)
class Planned:
    job: Job
    item: WorkItem
    final: bool  # carries the draft and gets logits: the job completes with this batch
    cached_before: int


@dataclass(slots=True)
class Outcome:
    planned: Planned
    result: ItemResult | None = None
    accepted: int = 0
    next_token: int = -1
    error: str | None = None
    residual_draws: int = 0  # sparse sampling's residual loop (acceptance.Decision)
    dense_fallback: bool = False
    sibling: bool = False  # the sibling at `accepted` was taken before `next_token` (acceptance.Decision)


def plan(job: Job, backend: Backend, default_chunk: int) -> Planned:
    """The work item for `job`'s next piece: a prefill chunk (context only) or its final item (context + draft)."""
    session = job.session
    sid = session.id
    cached = backend.cached_len(sid)
    ctx_pending = session.committed_len - cached
    if ctx_pending < 1:
        # The KV may hold at most every committed token but the last; anything more is stale.
        backend.truncate(sid, session.committed_len - 1)
        cached = backend.cached_len(sid)
        ctx_pending = session.committed_len - cached
    new = session.tokens[cached:]
    chunk = job.max_tokens or default_chunk
    if ctx_pending + len(job.draft) + len(job.siblings) > chunk and ctx_pending > 1:
        # Chunked prefill: push context only, keep at least the last context token for the final item.
        n = min(chunk, ctx_pending - 1)
        item = WorkItem(
            sid,
            new[:n],
            n_logits=0,
            sampling=session.work_sampling,
            context=session.tokens,
            deadline=job.deadline,
        )
        return Planned(job, item, final=False, cached_before=cached)
    item = WorkItem(
        sid,
        new + job.draft + job.siblings,
        n_logits=len(job.draft) + 1 + len(job.siblings),
        sampling=session.work_sampling,
        context=session.tokens,
        deadline=job.deadline,
        support=[q.ids.tolist() for q in job.q] if job.q else None,
        siblings=len(job.siblings),
    )
    return Planned(job, item, final=True, cached_before=cached)


def ran_shape(p: Planned) -> ItemShape:
    """The estimator's view of a planned item; left on the job (`ran_shape`, `final`) for the wait hints."""
    job = p.job
    # A round whose KV was lost (evicted) rebuilds its whole context first: a cache miss.
    miss = job.kind != JobKind.open and p.cached_before == 0 and job.batches == 0 and job.cache_miss
    shape = ItemShape(len(p.item.new_tokens), p.cached_before, miss)
    job.ran_shape = shape
    job.final = p.final
    return shape


def fit_budget(planned: list[Planned], kv_budget_tokens: int) -> tuple[list[Planned], list[Planned]]:
    """Split the plan into the longest prefix whose KV fits the budget together (at least one job), and the rest."""
    total = 0
    for i, p in enumerate(planned):
        total += p.cached_before + len(p.item.new_tokens)
        if i and total > kv_budget_tokens:
            return planned[:i], planned[i:]
    return planned, []


def cut(session: Session, proposed: list[int], eos: frozenset[int], max_context_len: int) -> tuple[int, bool]:
    """How many of the proposed tokens to commit, and whether the session ends with them.

    A sequence ends at EOS or a stop token (inclusive), at max_new_tokens, or at max_context_len. Cutting an
    accepted run short is still exact: a prefix of a target sample is a target sample of that prefix.
    """
    room = min(session.max_new_tokens - session.generated, max_context_len - session.committed_len)
    take = max(1, min(len(proposed), room))
    for i, tok in enumerate(proposed[:take]):
        if tok in eos or tok in session.stop_ids:
            return i + 1, True
    return take, take >= room
