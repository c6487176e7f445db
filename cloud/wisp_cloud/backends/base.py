"""The backend interface: what the verifier needs from a model engine, and nothing more.

A backend owns the target model and each sequence's KV cache. The server owns everything else (sessions,
acceptance, scheduling). Sequences are identified by an opaque `seq_id` string.

KV convention: the backend caches the first `cached_len(seq_id)` tokens of a sequence. A work item supplies the
tokens that follow the cached part (`new_tokens`); after the forward pass those tokens are cached too, and the
server calls `truncate` to drop a rejected draft tail. The logits a verify item needs are those predicting the
token after each of the last `n_logits` new tokens (the last pending context token and every draft token).

Siblings (a token tree of one alternative per draft position): the last `siblings` new tokens of an item are
alternatives to its first `siblings` draft tokens. Sibling j takes draft token j's position and sees exactly what
draft token j sees (the cached prefix, the pending context, draft[:j]) plus itself; every other token ignores the
siblings. They are cached after the draft like any new token, so a verdict always truncates back before them (a
committed sibling is fed again, at its place, as the next round's pending context).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Sampling:
    """How a sequence samples: temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters.

    A plain dataclass (no pydantic), so backends import on a GPU image that has none; the wire's
    `wisp_sdk.protocol.SamplingParams` has the same fields (`Sampling.of` copies one).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def of(cls, params: object) -> Sampling:
        """From anything with the four fields (e.g. `SamplingParams`)."""
        return cls(
            float(params.temperature),  # type: ignore[attr-defined]
            float(params.top_p),  # type: ignore[attr-defined]
            int(params.top_k),  # type: ignore[attr-defined]
            params.seed,  # type: ignore[attr-defined]
        )


@dataclass
class WorkItem:
    """One sequence's share of a batched forward pass (prefill chunk, verify, or decode)."""

    seq_id: str
    new_tokens: list[int]  # tokens after the cached prefix, in order
    n_logits: int = 1  # how many trailing positions need an output distribution
    sampling: Sampling = field(default_factory=Sampling)
    # Full committed context (prompt + committed), so that a backend that lost the KV can rebuild it.
    context: list[int] | None = None
    # Absolute deadline (time.monotonic() seconds) of the job this item serves, None when it has none. A backend
    # with its own queue (sglang: request priority) orders by it; the native backend ignores it.
    deadline: float | None = None
    # Sampling verifies: per draft token, the ids where p is needed (q's support, the drafted token among them).
    # Backends that return the whole p ignore it.
    support: list[list[int]] | None = None
    # Trailing new tokens that are siblings of the first draft tokens (see the module doc); their logits are
    # the last `siblings` of the `n_logits` rows.
    siblings: int = 0

    @property
    def draft_start(self) -> int:
        """Index in `new_tokens` of a verify item's first draft token (the pending context comes before it):
        sibling j takes the position of new token `draft_start + j`."""
        return len(self.new_tokens) - self.n_logits + 1


class SparseTarget:
    """A sampling item's target p known only where it was asked, plus draws from p (the SGLang backend's
    `--sglang-sampling sparse`): what `sparse_acceptance.accept_sampling_sparse` needs instead of a [n, V] p.

    Positions count like `n_logits` (0 = after the last context token, k = the bonus after k draft tokens).
    A backend that returns dense `probs` never makes one; this base answers nothing.
    """

    def p_at(self, pos: int, token: int) -> float:
        """p(token) at `pos`, for a token the item asked about (`WorkItem.support`: draft token, q's support)."""
        raise NotImplementedError

    def sample(self, pos: int) -> int:
        """One draw from p at `pos`, made with the forward (independent of everything else)."""
        raise NotImplementedError

    def draw(self, pos: int, n: int) -> list[int]:
        """`n` further independent draws from p at `pos` (a model call)."""
        raise NotImplementedError

    def dense(self, pos: int) -> object:
        """The whole row p at `pos` (float [V]): the expensive fallback."""
        raise NotImplementedError


def check_batch(items: list[WorkItem]) -> None:
    """The batch contract every backend's `forward` enforces: each sequence once, at least one new token, and
    no more output distributions than new tokens (ValueError names the first item that breaks it)."""
    if len({it.seq_id for it in items}) != len(items):
        raise ValueError("a batch may hold each sequence once")
    for it in items:
        if not it.new_tokens:
            raise ValueError(f"work item for {it.seq_id} has no new tokens")
        if not 0 <= it.n_logits <= len(it.new_tokens):
            raise ValueError(f"work item for {it.seq_id} asks for {it.n_logits} logits")
        if it.siblings and not 0 < it.siblings < it.n_logits - it.siblings:
            raise ValueError(f"work item for {it.seq_id} has {it.siblings} siblings for too short a draft")


@dataclass
class ItemResult:
    """Per item: argmax at each of the `n_logits` positions, and the target distribution when sampling.

    `probs` is a float32 array-like of shape [n_logits, vocab] after temperature/top-k/top-p (None when greedy);
    a backend that never builds it returns `sparse` instead (argmax is then empty: only sampling items do this).
    """

    seq_id: str
    argmax: list[int]
    probs: object | None = None
    sparse: SparseTarget | None = None


@dataclass
class BatchStats:
    """What the estimator learns from: the shape of a batch that ran and how long its forward took."""

    batch_size: int
    new_tokens: int
    context_tokens: int  # sum of cached prefix lengths
    max_context: int
    cache_misses: int  # items whose cached prefix had to be rebuilt
    forward_s: float

    @classmethod
    def of(cls, items: list[WorkItem], cached: list[int], forward_s: float) -> BatchStats:
        """Stats of a batch that ran, given each item's cached prefix length before the forward."""
        return cls(
            batch_size=len(items),
            new_tokens=sum(len(it.new_tokens) for it in items),
            context_tokens=sum(cached),
            max_context=max(cached, default=0),
            # Items (re)building context rather than verifying/decoding after a warm prefix: they pay a prefill.
            cache_misses=sum(
                1
                for it, c in zip(items, cached, strict=True)
                if it.context is not None and c < len(it.context) - 1
            ),
            forward_s=forward_s,
        )


@runtime_checkable
class Backend(Protocol):
    name: str
    vocab_size: int
    eos_token_ids: list[int]
    tokenizer_fingerprint: str

    @property
    def max_positions(self) -> int | None:
        """The most positions a sequence may hold (None: no limit known); the engine caps contexts at it."""
        ...

    @property
    def max_siblings(self) -> int:
        """The most siblings a verify item may carry (0: this backend verifies chains only)."""
        ...

    @property
    def graph_stats(self) -> dict[str, float] | None:
        """CUDA-graph counters for the step log (replays, captures, capture_s, eager); None without graphs."""
        ...

    def forward(self, items: list[WorkItem]) -> tuple[list[ItemResult], BatchStats]:
        """Run one batched forward over a ragged batch: each item its own cached length and new tokens."""
        ...

    def cached_len(self, seq_id: str) -> int:
        """Tokens of `seq_id` held in the KV cache (0 when unknown or evicted)."""
        ...

    def truncate(self, seq_id: str, length: int) -> None:
        """Drop cached tokens past `length` (a rejected draft tail)."""
        ...

    def release(self, seq_id: str) -> None:
        """Free everything held for `seq_id`."""
        ...

    def kv_bytes(self, seq_id: str | None = None) -> int:
        """KV memory held by one sequence, or by all when `seq_id` is None."""
        ...
