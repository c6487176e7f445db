"""Page bookkeeping for a paged KV cache: a free list of fixed-size pages and one block table per sequence.

Pure Python, no torch: the device tensors live in the backend; this class only says which page holds which
token. Page 0 is reserved as a scratch page (padding tokens of a CUDA-graph bucket write their K/V there), so
`num_pages` usable pages are numbered 1..num_pages.
"""

from __future__ import annotations


class KVCacheFull(RuntimeError):
    """The KV budget cannot hold what a forward pass asked for. Nothing was allocated or run."""


class PageTable:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need at least one page of at least one token (got {num_pages} x {page_size})")
        self.num_pages = num_pages
        self.page_size = page_size
        # Pop from the end: low page ids are handed out first.
        self._free: list[int] = list(range(num_pages, 0, -1))
        self.pages: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}

    # ---- queries ----
    def length(self, seq_id: str) -> int:
        return self.lengths.get(seq_id, 0)

    def free_pages(self) -> int:
        return len(self._free)

    def used_pages(self, seq_id: str | None = None) -> int:
        if seq_id is None:
            return self.num_pages - len(self._free)
        return len(self.pages.get(seq_id, ()))

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    # ---- changes ----
    def reserve(self, wants: dict[str, int]) -> None:
        """Grow each sequence to hold `wants[seq_id]` tokens in total, all or nothing.

        Raises KVCacheFull (and changes nothing) when the free pages don't cover every sequence's growth.
        """
        need = 0
        for seq_id, n in wants.items():
            need += max(0, self.pages_for(n) - len(self.pages.get(seq_id, ())))
        if need > len(self._free):
            raise KVCacheFull(
                f"KV cache full: this batch needs {need} more pages of {self.page_size} tokens, "
                f"{len(self._free)} of {self.num_pages} are free; release or truncate sequences, "
                "or give the backend a larger kv budget"
            )
        for seq_id, n in wants.items():
            pages = self.pages.setdefault(seq_id, [])
            self.lengths.setdefault(seq_id, 0)
            while len(pages) < self.pages_for(n):
                pages.append(self._free.pop())

    def set_length(self, seq_id: str, n_tokens: int) -> None:
        self.lengths[seq_id] = n_tokens

    def truncate(self, seq_id: str, n_tokens: int) -> None:
        if seq_id not in self.pages:
            return
        n_tokens = max(0, min(n_tokens, self.lengths.get(seq_id, 0)))
        self.lengths[seq_id] = n_tokens
        pages = self.pages[seq_id]
        keep = self.pages_for(n_tokens)
        while len(pages) > keep:
            self._free.append(pages.pop())

    def release(self, seq_id: str) -> None:
        pages = self.pages.pop(seq_id, None)
        self.lengths.pop(seq_id, None)
        if pages:
            self._free.extend(reversed(pages))

    def slots(self, seq_id: str, start: int, stop: int) -> list[int]:
        """Flat cache slots (page * page_size + offset) of token positions start..stop-1."""
        pages, p = self.pages[seq_id], self.page_size
        return [pages[i // p] * p + i % p for i in range(start, stop)]
