"""What the scheduler schedules: a `Request` (one unit of a session's model work), the `Slot` a piece of it takes in
a `Batch`, and the batch itself. Plain data: no asyncio, no torch."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Literal

from wisp_cloud.estimator import ItemShape

Kind = Literal["prefill", "verify", "decode"]
_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One unit of model work a session waits for. `payload` is the caller's own object (untouched)."""

    session_id: str
    kind: Kind
    new_tokens: int  # tokens after the cached prefix: prompt (prefill), pending+draft (verify), 1 (decode)
    context_len: int  # cached prefix length when the request arrived
    deadline: float  # time the answer must reach the device (deadlines.py)
    arrival: float
    expected_tokens: float = 1.0  # tokens the answer is expected to commit (density's numerator)
    cache_miss: bool = False  # the cached prefix must be rebuilt first
    downlink_s: float = 0.0
    payload: Any = None
    tenant: str = "anon"  # who pays for it in fair sharing (sched/fairness.py): the auth token's id
    done: int = 0  # tokens of new_tokens already processed (chunked prefill)
    first_scheduled: float | None = None
    rid: int = field(default_factory=lambda: next(_ids))
    # Predicted seconds of this request alone, and of its joining a running batch, when a policy computed them
    # (WispPolicy does): the engine reuses them for the SLO interference metric and the wait hint.
    solo_s: float | None = None
    marginal_s: float | None = None
    # WispPolicy's cache of this request's raw (uncorrected) times: (key, shape, solo, rest); see WispPolicy._cand
    wisp_memo: tuple | None = field(default=None, repr=False)

    @property
    def remaining(self) -> int:
        return self.new_tokens - self.done

    def shape(self, n: int | None = None) -> ItemShape:
        """Shape of the next piece of n tokens (all remaining ones by default)."""
        return ItemShape(
            new_tokens=self.remaining if n is None else n,
            context=self.context_len + self.done,
            cache_miss=self.cache_miss and self.done == 0,
        )


@dataclass
class Slot:
    """A request's piece of a batch: tokens [start, start + n_tokens) of its new tokens."""

    request: Request
    start: int
    n_tokens: int
    best_effort: bool = False  # the policy knew it could not make its deadline

    @property
    def final(self) -> bool:
        return self.start + self.n_tokens >= self.request.new_tokens

    @property
    def shape(self) -> ItemShape:
        r = self.request
        return ItemShape(self.n_tokens, r.context_len + self.start, r.cache_miss and self.start == 0)


@dataclass
class Batch:
    slots: list[Slot]
    formed_at: float
    predicted_s: float = 0.0

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def shapes(self) -> list[ItemShape]:
        return [s.shape for s in self.slots]

    @property
    def requests(self) -> list[Request]:
        return [s.request for s in self.slots]
