"""Emulated edge devices: the real `AsyncEdgeClient` (protocol, resume, controllers, stats) with only the draft
model replaced, and the device's link shaped inside the client.

`EmulatedDraft` stands in for `DraftRunner` (same `sync`/`propose` interface). It knows the target's greedy
continuation of its prompt (precomputed by the same server) and replays a measured acceptance trace: at
generated position j it proposes the target's true token if the trace says the real draft's token was
accepted there, a wrong token otherwise, with the real draft's confidence (top-1 probability, entropy) at j,
which is what the Wisp controller's predictor reads. Feeding tokens sleeps for the device profile's time.

`ShapedTransport` (a `ShapedClient`'s link) delays every frame by the link profile (RTT/2 + half-normal jitter + size/bandwidth), up on
send and down on receive, so the client's own RTT estimates and the user-visible TTFT/TPOT include the link.
"""

from __future__ import annotations

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from wisp_sdk.client import AsyncEdgeClient
from wisp_sdk.draft_runner import DraftToken
from wisp_sdk.protocol import SamplingParams, encode
from wisp_sdk.transport import Transport

from wisp_cloud.fleet.profiles import DeviceProfile, LinkProfile
from wisp_cloud.fleet.trace_sequence import TraceSequence


class EmulatedDraft:
    """Drop-in for `DraftRunner` on an emulated device (greedy sessions)."""

    def __init__(
        self,
        prompt_len: int,
        truth: list[int],
        trace: TraceSequence,
        device: DeviceProfile,
        vocab_size: int,
        eos: set[int],
        seed: int = 0,
    ) -> None:
        self.prompt_len = prompt_len
        self.truth = truth
        self.trace = trace
        self.device = device
        self.vocab_size = vocab_size
        self.eos = eos
        self.rng = random.Random(seed)
        self.tokens: list[int] = []
        self.busy_s = 0.0  # total time spent "drafting" (sleeping)

    def _feed(self, n: int) -> float:
        if n <= 0:
            return 0.0
        dt = self.device.step_s(self.rng, n)
        if dt > 0:
            time.sleep(dt)
        self.busy_s += dt
        return dt * 1000.0

    def sync(self, context: list[int]) -> float:
        common = 0
        limit = min(len(self.tokens), len(context))
        while common < limit and self.tokens[common] == context[common]:
            common += 1
        if common == len(context) and len(self.tokens) == len(context):
            return 0.0
        keep = min(common, len(context) - 1)
        n_new = len(context) - keep
        self.tokens = list(context)
        return self._feed(n_new)

    def _on_track(self) -> bool:
        gen = self.tokens[self.prompt_len :]
        return gen == self.truth[: len(gen)]

    def _wrong(self, tok: int) -> int:
        w = (tok + 1) % self.vocab_size
        while w in self.eos:
            w = (w + 1) % self.vocab_size
        return w

    def propose(self, sampling: SamplingParams, rng: Any = None, alt: bool = False) -> DraftToken:
        pos = len(self.tokens) - self.prompt_len
        ok, top1, ent = self.trace.at(pos)
        true_tok = self.truth[pos] if pos < len(self.truth) else None
        right = true_tok is not None and self._on_track()
        token = true_tok if ok and right else self._wrong(0 if true_tok is None else true_tok)
        second = None
        if alt:  # the real draft's second choice was the target's token where the trace says so
            hit = right and not ok and self.trace.second[pos % len(self.trace.second)]
            second = true_tok if hit else self._wrong(token)
        return DraftToken(token=token, prob=top1, entropy=ent, top1=top1, alt=second)


class ShapedTransport(Transport):
    """`Transport` with the link profile applied to every frame, up on send and down on receive."""

    link: LinkProfile | None = None
    link_rng: random.Random

    async def send(self, msg: Any) -> None:
        link = self.link
        if link is not None and (link.rtt_ms or link.jitter_ms):
            await asyncio.sleep(link.one_way_s(self.link_rng, len(encode(msg)), up=True))
        await super().send(msg)

    async def recv(self) -> tuple[Any, float]:
        msg, arrived = await super().recv()
        link = self.link
        if link is not None and (link.rtt_ms or link.jitter_ms):
            await asyncio.sleep(link.one_way_s(self.link_rng, len(encode(msg)), up=False))
            arrived = time.perf_counter()
        return msg, arrived


class ShapedClient(AsyncEdgeClient):
    """`AsyncEdgeClient` with a `ShapedTransport`, and an optional emulated draft.

    Hook used: the client loads no ONNX model in centralized mode, so an emulated device is built as a
    centralized-mode client whose mode and runner are then set (no change to client.py needed).
    """

    @classmethod
    def from_prototype(
        cls,
        proto: AsyncEdgeClient,
        mode: str,
        runner: Any = None,
        link: LinkProfile | None = None,
        seed: int = 0,
        controller: Any = None,
    ) -> ShapedClient:
        """A fresh client sharing the prototype's manifest and tokenizer (loading them per device is slow)."""
        obj = cls.__new__(cls)
        obj.__dict__.update(proto.__dict__)
        obj.mode = mode
        obj.runner = runner
        transport = ShapedTransport.like(proto._transport)
        transport.link = link
        transport.link_rng = random.Random(seed)
        obj._transport = transport
        obj.last_result = None
        obj._lock = None
        obj._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wisp-emu")
        if controller is not None:
            obj.controller_spec = controller
        return obj
