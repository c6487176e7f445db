"""Weighted fair sharing of the verifier across tenants (auth tokens): start-time fair queueing over tokens.

Each tenant has a virtual finish time F; serving n tokens of a tenant of weight w advances it by n / w. When
the waiting requests belong to several tenants, `FairShare.order` merges them by virtual start time, each
tenant's own requests kept in the policy's order (WISP: urgency, then density), and the scheduler offers the
policy only the first `max_batch` of that merge. A tenant with 200 sessions therefore cannot crowd another
out of the batch: it waits for its share; the other keeps its SLO. Virtual time V follows the latest start
tag served, so an idle tenant banks no credit and a busy one carries no debt once it goes idle.

Pure and clock-free: the engine and `wisp simulate` drive it through `Scheduler`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from wisp_cloud.sched.requests import Batch, Request

ANON = "anon"  # the tenant of every session opened without an auth token


@dataclass
class FairShare:
    """Per-tenant virtual finish times; weights by tenant id (missing: `default_weight`)."""

    weights: Mapping[str, float] = field(default_factory=dict)
    default_weight: float = 1.0
    vtime: float = 0.0
    # Virtual finish time of each tenant's served work; a tenant at or behind `vtime` is dropped (bounded).
    finish: dict[str, float] = field(default_factory=dict)
    # Tokens served per tenant since start (for tests and /metrics-style reporting); bounded by tenants seen.
    served: dict[str, int] = field(default_factory=dict)

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, self.default_weight)

    def order(self, ranked: Sequence[Request]) -> list[Request]:
        """`ranked` (the policy's preference order) merged across tenants by virtual start time.

        Within a tenant the order of `ranked` stands; across tenants the next request of the tenant with the
        smallest start tag goes first (ties: the policy's order).
        """
        tag: dict[str, float] = {}
        keyed: list[tuple[float, int, Request]] = []
        for pos, r in enumerate(ranked):
            t = r.tenant
            start = tag.get(t)
            if start is None:
                start = max(self.vtime, self.finish.get(t, 0.0))
            keyed.append((start, pos, r))
            tag[t] = start + max(r.remaining, 1) / self.weight(t)
        keyed.sort(key=lambda k: (k[0], k[1]))
        return [r for _, _, r in keyed]

    def charge(self, batch: Batch) -> None:
        """Advance the tenants of a batch just formed by the tokens each got, and virtual time with them."""
        latest = self.vtime
        for s in batch.slots:
            t = s.request.tenant
            start = max(self.vtime, self.finish.get(t, 0.0))
            latest = max(latest, start)
            self.finish[t] = start + s.n_tokens / self.weight(t)
            self.served[t] = self.served.get(t, 0) + s.n_tokens
        self.vtime = latest
        for t in [t for t, f in self.finish.items() if f <= self.vtime]:
            del self.finish[t]
