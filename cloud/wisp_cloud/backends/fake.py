"""A model-free backend for engine, gateway and scheduler tests and for the host-path benchmark.

The "model" is a deterministic next-token function of the previous token and its position (`next_token`), so a
client can draft exactly what the target will say (or corrupt drafts at a chosen rate) without any weights. A
forward pass sleeps `base_s + per_token_s × new tokens`: the sleep releases the GIL like a GPU kernel does, so the
engine's own host work is what a benchmark measures. Lossless claims are never tested against this backend: the
real-model tests do that.
"""

from __future__ import annotations

import time

import numpy as np

from wisp_cloud.backends.base import BatchStats, ItemResult, WorkItem

FAKE_FINGERPRINT = "sha256:" + "fa" * 32


def next_token(prev: int, position: int, vocab_size: int) -> int:
    """The fake target's greedy continuation: token at `position + 1` after `prev` at `position`."""
    return (prev * 1103515245 + position * 12345 + 7) % vocab_size


class FakeBackend:
    name = "fake"
    graph_stats: dict[str, float] | None = None
    max_siblings = 16

    def __init__(
        self,
        vocab_size: int = 1000,
        *,
        base_s: float = 0.0,
        per_token_s: float = 0.0,
        eos_token_ids: list[int] | None = None,
        max_positions: int = 1 << 20,
    ) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids or [])
        self.tokenizer_fingerprint = FAKE_FINGERPRINT
        self.max_positions = max_positions
        self.base_s = base_s
        self.per_token_s = per_token_s
        self._kv: dict[str, list[int]] = {}
        self.forwards = 0

    def forward(self, items: list[WorkItem]) -> tuple[list[ItemResult], BatchStats]:
        t0 = time.perf_counter()
        cached = [len(self._kv.get(it.seq_id, ())) for it in items]
        results = []
        for it in items:
            seq = self._kv.setdefault(it.seq_id, [])
            seq += it.new_tokens
            m = it.siblings  # cached after the draft, each at its draft token's position (base.py)
            n = len(seq) - m
            first = n - (it.n_logits - m)
            argmax = [next_token(seq[p], p, self.vocab_size) for p in range(first, n)]
            at = len(seq) - len(it.new_tokens) + it.draft_start  # position of draft token 0
            argmax += [next_token(seq[n + j], at + j, self.vocab_size) for j in range(m)]
            probs = None if it.sampling.greedy else self._probs(argmax)
            results.append(ItemResult(it.seq_id, argmax, probs))
        delay = self.base_s + self.per_token_s * sum(len(it.new_tokens) for it in items)
        if delay > 0:
            time.sleep(max(0.0, delay - (time.perf_counter() - t0)))
        self.forwards += 1
        return results, BatchStats.of(items, cached, time.perf_counter() - t0)

    def _probs(self, argmax: list[int]) -> np.ndarray:
        """A peaked distribution per position: half the mass on the greedy token, the rest on its 4 successors."""
        out = np.zeros((len(argmax), self.vocab_size), dtype=np.float32)
        for row, tok in enumerate(argmax):
            out[row, tok] = 0.5
            for j in range(1, 5):
                out[row, (tok + j) % self.vocab_size] += 0.125
        return out

    def cached_len(self, seq_id: str) -> int:
        return len(self._kv.get(seq_id, ()))

    def truncate(self, seq_id: str, length: int) -> None:
        seq = self._kv.get(seq_id)
        if seq is not None:
            del seq[max(length, 0) :]

    def release(self, seq_id: str) -> None:
        self._kv.pop(seq_id, None)

    def kv_bytes(self, seq_id: str | None = None) -> int:
        if seq_id is not None:
            return 4 * len(self._kv.get(seq_id, ()))
        return 4 * sum(len(s) for s in self._kv.values())
