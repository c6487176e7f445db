"""Page bookkeeping for a paged KV cache: a free list of fixed-size pages and one block table per sequence.

Pure Python, no torch: the device tensors live in the backend; this class only says which page holds which
token. Page 0 is reserved as a scratch page (padding tokens of a CUDA-graph bucket write their K/V there), so
`num_pages` usable pages are numbered 1..num_pages.

`changed` lets a consumer mirror the block tables (the paged backend keeps them as rows of one numpy array):
every method that changes a sequence's page list records the lowest block index that may differ since the
consumer last looked (the consumer pops the entry when it syncs); a sequence new to the table records 0.
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
        self.changed: dict[str, int] = {}  # seq_id -> lowest block index changed since the consumer synced

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
        ps = self.page_size
        grow = []
        need = 0
        for seq_id, n in wants.items():
            pages = self.pages.get(seq_id)
            more = -(-n // ps) - (0 if pages is None else len(pages))
            if more > 0 or pages is None:
                grow.append((seq_id, pages, more))
                if more > 0:
                    need += more
        if need > len(self._free):
            raise KVCacheFull(
                f"KV cache full: this batch needs {need} more pages of {self.page_size} tokens, "
                f"{len(self._free)} of {self.num_pages} are free; release or truncate sequences, "
                "or give the backend a larger kv budget"
            )
        free, changed = self._free, self.changed
        for seq_id, pages, more in grow:
            if pages is None:
                pages = self.pages[seq_id] = []
                self.lengths.setdefault(seq_id, 0)
                changed[seq_id] = 0
            if more > 0:
                old = len(pages)
                pages.extend(free[: -more - 1 : -1])  # popped from the end, one by one
                del free[-more:]
                if changed.get(seq_id, old) >= old:
                    changed[seq_id] = old

    def set_length(self, seq_id: str, n_tokens: int) -> None:
        self.lengths[seq_id] = n_tokens

    def truncate(self, seq_id: str, n_tokens: int) -> None:
        pages = self.pages.get(seq_id)
        if pages is None:
            return
        n_tokens = max(0, min(n_tokens, self.lengths.get(seq_id, 0)))
        self.lengths[seq_id] = n_tokens
        keep = -(-n_tokens // self.page_size)
        if len(pages) > keep:
            free = self._free
            while len(pages) > keep:
                free.append(pages.pop())
            if self.changed.get(seq_id, keep) >= keep:
                self.changed[seq_id] = keep

    def release(self, seq_id: str) -> None:
        pages = self.pages.pop(seq_id, None)
        self.lengths.pop(seq_id, None)
        self.changed.pop(seq_id, None)
        if pages:
            self._free.extend(reversed(pages))

    def slots(self, seq_id: str, start: int, stop: int) -> list[int]:
        """Flat cache slots (page * page_size + offset) of token positions start..stop-1."""
        pages, p = self.pages[seq_id], self.page_size
        return [pages[i // p] * p + i % p for i in range(start, stop)]
