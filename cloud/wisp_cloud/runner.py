"""The run half of a step: the batched forward and acceptance, on the engine's worker thread.

One job's failure is its own: a failed acceptance fails that job, and a failed forward is retried item by item
(after rolling each item's KV back) to find the culprit, so one bad sequence never fails its neighbours.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from wisp_cloud.acceptance import Decision, accept_greedy, accept_sampling, sample_token
from wisp_cloud.backends.base import Backend, BatchStats, ItemResult
from wisp_cloud.jobs import Job, JobKind
from wisp_cloud.planner import Outcome, Planned
from wisp_cloud.sparse_acceptance import accept_sampling_sparse

log = logging.getLogger("wisp.engine")

# Sparse sampling decisions settled at once (each may wait on the backend for residual draws).
SPARSE_WORKERS = 32


class InjectedFault(RuntimeError):
    """Raised by the debug fault hook (ServerConfig.fault_token)."""


class Runner:
    def __init__(self, backend: Backend, fault_token: int | None = None) -> None:
        self.backend = backend
        self.fault_token = fault_token  # debug: a draft holding this token fails inside the step
        self._pool: ThreadPoolExecutor | None = None  # sparse sampling's acceptance, made on first use

    def run(self, planned: list[Planned]) -> tuple[list[Outcome], BatchStats]:
        """Worker thread: run the batch; if the forward fails, roll back and run each item alone to find the culprit."""
        try:
            return self._forward(planned)
        except Exception as exc:
            if len(planned) == 1:
                self.backend.truncate(planned[0].job.session.id, planned[0].cached_before)
                log.exception("forward failed for session %s", planned[0].job.session.id[:8])
                return [Outcome(planned[0], error=f"{type(exc).__name__}")], _empty_stats(planned)
            log.exception("batched forward failed; retrying its %d items one by one", len(planned))
        outcomes: list[Outcome] = []
        total = _empty_stats(planned)
        for p in planned:
            self.backend.truncate(p.job.session.id, p.cached_before)
        for p in planned:
            out, stats = self.run([p])
            outcomes += out
            total.forward_s += stats.forward_s
        return outcomes, total

    def _forward(self, planned: list[Planned]) -> tuple[list[Outcome], BatchStats]:
        """Worker thread: the forward pass and acceptance (per job: one job's failure is its own)."""
        results, stats = self.backend.forward([p.item for p in planned])
        outcomes = [Outcome(p, res) for p, res in zip(planned, results, strict=True)]
        final = [out for out in outcomes if out.planned.final]
        sparse = [out for out in final if out.result is not None and out.result.sparse is not None]
        if len(sparse) > 1:
            # A sparse sampling decision may ask the backend for more draws (a model call): settle them side by
            # side, so the backend batches the retries of the whole step instead of one round trip per session.
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=SPARSE_WORKERS, thread_name_prefix="wisp-accept")
            list(self._pool.map(self._settle, sparse))
            final = [out for out in final if out.result is None or out.result.sparse is None]
        for out in final:
            self._settle(out)
        return outcomes, stats

    def _settle(self, out: Outcome) -> None:
        """Acceptance for one final item; its failure is its job's alone."""
        job = out.planned.job
        try:
            assert out.result is not None
            d = self._decide(job, out.result)
            out.accepted, out.next_token, out.sibling = d.accepted, d.next_token, d.sibling
            out.residual_draws, out.dense_fallback = d.residual_draws, d.dense_fallback
        except Exception as exc:
            log.exception("acceptance failed for session %s", job.session.id[:8])
            out.error = type(exc).__name__

    def _decide(self, job: Job, res: ItemResult) -> Decision:
        session = job.session
        if self.fault_token is not None and self.fault_token in job.draft:
            raise InjectedFault("debug fault token in draft")
        if job.kind != JobKind.round or not job.draft:
            if session.sampling.greedy:
                return Decision(0, res.argmax[0])
            if res.sparse is not None:
                return Decision(0, res.sparse.sample(0))
            return Decision(0, sample_token(torch.as_tensor(res.probs)[0], session.gen))
        if session.sampling.greedy:
            return accept_greedy(job.draft, res.argmax, job.siblings)
        if res.sparse is not None:  # backends with sparse targets take no siblings (max_siblings 0)
            return accept_sampling_sparse(job.draft, job.q or [], res.sparse, session.gen)
        return accept_sampling(job.draft, job.q or [], torch.as_tensor(res.probs), session.gen, job.siblings)


def _empty_stats(planned: list[Planned]) -> BatchStats:
    return BatchStats(
        batch_size=len(planned), new_tokens=0, context_tokens=0, max_context=0, cache_misses=0, forward_s=0.0
    )
