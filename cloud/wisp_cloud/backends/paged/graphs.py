"""CUDA graphs of the paged engine: one per bucket of batch shapes, captured on a shape's second sight.

Everything that changes from step to step is one int32 buffer (`batch.Batch`) copied in before the replay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wisp_cloud.backends.paged.batch import Batch, views

log = logging.getLogger("wisp_cloud.backends.paged")

ForwardFn = Callable[[dict[str, torch.Tensor], Batch], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Graph:
    graph: Any
    host: torch.Tensor  # pinned int32
    host_np: np.ndarray  # a numpy view of `host`
    dev: torch.Tensor
    argmax: torch.Tensor
    logits: torch.Tensor
    views: dict[str, np.ndarray] = field(default_factory=dict)  # of host_np, by field (the packer fills them)


@dataclass
class GraphOutputs:
    """Logits and argmax buffers that every graph writes its rows into (the first R rows)."""

    logits: torch.Tensor  # [max rows, vocab]
    argmax: torch.Tensor  # [max rows] int64


class GraphCache:
    """Graphs by bucket key, at most `max_graphs`; a key is captured once seen `capture_after` times."""

    def __init__(self, device: torch.device, max_graphs: int = 512, capture_after: int = 2) -> None:
        self.device = device
        self.max_graphs = max_graphs
        self.capture_after = capture_after
        self.graphs: dict[tuple, Graph] = {}
        self.key_seen: dict[tuple, int] = {}
        self.pool: Any = None
        # what the cache did: replays, captures (and their seconds), eager runs (no graph for the shape)
        self.stats: dict[str, float] = {"replays": 0, "captures": 0, "capture_s": 0.0, "eager": 0}

    def get(self, key: tuple) -> tuple[Graph | None, bool]:
        """(the key's graph or None, whether to capture one now)."""
        gr = self.graphs.get(key)
        if gr is not None:
            return gr, False
        seen = self.key_seen[key] = self.key_seen.get(key, 0) + 1
        # a shape seen once (a capture costs ~3 forwards), or enough graphs held: run it eagerly
        return None, len(self.graphs) < self.max_graphs and seen >= self.capture_after

    def capture(self, key: tuple, batch: Batch, forward_tokens: ForwardFn, warmups: int = 2) -> Graph:
        """Capture the bucket's graph. The warm-up runs (Triton compiles, cuBLAS heuristics) see the real batch
        that asked for the bucket: they write the same K/V the replay will write again, so this is harmless."""
        host = torch.from_numpy(batch.host.copy()).pin_memory()
        dev = host.to(self.device)
        dev_views = views(dev, batch)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(warmups):  # compile the Triton kernels and warm cuBLAS outside the capture
                forward_tokens(dev_views, batch)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            argmax, logits = forward_tokens(dev_views, batch)
        log.debug("captured CUDA graph for bucket (T, B, tok, W, R, tiles)=%s", key)
        host_np = host.numpy()
        return Graph(graph, host, host_np, dev, argmax, logits, views(host_np, batch))

    def clear(self) -> None:
        self.graphs.clear()
        self.pool = None  # a pool whose graphs are all gone cannot be captured into again
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
