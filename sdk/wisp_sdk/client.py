"""EdgeClient / AsyncEdgeClient: draft on the device, verify in the cloud, over one websocket.

The client holds what outlives one request: the draft bundle (manifest, tokenizer, ONNX runner), the link to the
server (transport.py: the socket, reconnects and a balancer's affinity cookie) and one drafting thread. Each
request runs as a `generation.Generation` (its loop, timers and resume policy) over a `session.Session`
(protocol state, sans I/O).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from wisp_sdk.bundle import load_manifest
from wisp_sdk.controllers import Controller, make_controller
from wisp_sdk.draft_runner import DraftRunner
from wisp_sdk.errors import WispError
from wisp_sdk.generation import Generation
from wisp_sdk.predictor import RejectionPredictor
from wisp_sdk.protocol import SLO, Mode, SamplingParams, Welcome
from wisp_sdk.session import GenerationRequest, offers_start_on_server, server_decodes_next
from wisp_sdk.stats import GenerationResult
from wisp_sdk.tokenizer import DraftTokenizer
from wisp_sdk.transport import LinkDown, Transport, tls_context

Prompt = str | list[dict[str, Any]] | list[int]


class AsyncEdgeClient:
    """Asyncio client. One generation at a time per client (the draft model's KV cache is per client)."""

    def __init__(
        self,
        server: str,
        draft: str | Path,
        *,
        token: str | None = None,
        controller: str | Controller = "wisp",
        mode: Mode = "speculative",
        threads: int | None = None,
        providers: list[Any] | None = None,
        io_binding: bool = True,
        slo: SLO | None = None,
        resume_deadline_s: float = 30.0,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 1.0,
        response_timeout_s: float = 60.0,
        connect_timeout_s: float = 10.0,
        overload_retry_s: float = 10.0,
        ca_file: str | Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
        start_on_server: bool | None = None,
    ) -> None:
        if mode not in ("speculative", "centralized"):
            raise WispError(f"mode must be speculative or centralized, not {mode!r}")
        ssl_context = tls_context(server, ca_file, ssl_context)
        self.ssl_context = ssl_context
        self.server = server
        self.bundle = Path(draft)
        self.manifest = load_manifest(self.bundle)
        self.tokenizer = DraftTokenizer(self.bundle)
        self.token = token
        self.mode = mode
        self.controller_spec = controller
        self.predictor = RejectionPredictor.from_dict(self.manifest.predictor)
        self.slo = slo or SLO()
        self.resume_deadline_s = resume_deadline_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.response_timeout_s = response_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.overload_retry_s = overload_retry_s
        self._transport = Transport(
            server,
            fingerprint=self.manifest.tokenizer_fingerprint,
            token=token,
            ssl_context=ssl_context,
            connect_timeout_s=connect_timeout_s,
            response_timeout_s=response_timeout_s,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
        )
        # The centralized baseline needs no draft model: don't pay for loading it.
        self.runner = (
            DraftRunner(
                self.bundle,
                threads=threads,
                providers=providers,
                io_binding=io_binding,
                manifest=self.manifest,
            )
            if mode == "speculative"
            else None
        )
        # `Open.start_on_server`: None offers it where `offers_start_on_server` says it pays, from the draft's
        # prompt prefill time measured on the previous generations (`prefill_ms_per_token`); True always, False never
        self.start_on_server = start_on_server
        self.prefill_ms_per_token: float | None = None
        # the server decoded the last generation after moving it there (`server_decodes_next`): offer regardless
        self.server_decodes = False
        self.last_result: GenerationResult | None = None
        self._lock: asyncio.Lock | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wisp-draft")

    @property
    def welcome(self) -> Welcome | None:
        """The server's last Welcome (limits, policy); None before the first connect."""
        return self._transport.welcome

    # ---- public API ----

    async def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        slo: SLO | None = None,
        stop: list[str] | str | None = None,
        controller: str | Controller | None = None,
        timeout: float | None = None,
    ) -> GenerationResult:
        """Generate a completion; returns text, token ids (EOS included if hit) and stats.

        `timeout` (seconds) stops the generation and raises `TimeoutError`; a timeout, a cancelled task or an
        exception closes the server session at once (its KV is freed; the next generation starts right away).
        """
        async for _ in self.stream(
            prompt, max_new_tokens, temperature, top_p, top_k, seed, slo, stop, controller, timeout
        ):
            pass
        assert self.last_result is not None
        return self.last_result

    async def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        slo: SLO | None = None,
        stop: list[str] | str | None = None,
        controller: str | Controller | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[str]:
        """Yield text deltas as tokens are committed; the full result is then in `last_result`.

        Leaving the loop early (break, an exception, a cancelled task) or passing `timeout` (seconds, raising
        `TimeoutError`) stops drafting and closes the server session at once.
        """
        if timeout is not None and timeout <= 0:
            raise WispError(f"timeout must be > 0 seconds, not {timeout}")
        ids = self.encode_prompt(prompt)
        slo = slo or self.slo
        offer = self.start_on_server
        if offer is None:
            offer = self.server_decodes or offers_start_on_server(
                len(ids), max_new_tokens, slo.tpot_ms, self.prefill_ms_per_token
            )
        request = GenerationRequest(
            prompt_ids=ids,
            max_new_tokens=max_new_tokens,
            sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
            slo=slo,
            stop=[stop] if isinstance(stop, str) else list(stop or []),
            mode=self.mode,
            start_on_server=offer,
        )
        ctl = make_controller(controller or self.controller_spec, self.predictor)
        if self._lock is None:
            self._lock = asyncio.Lock()
        deadline = None if timeout is None else time.monotonic() + timeout
        async with self._lock:
            generation = Generation(
                request,
                ctl,
                transport=self._transport,
                runner=self.runner,
                pool=self._pool,
                eos_token_ids=self.manifest.eos_token_ids,
                tokenizer=self.tokenizer,
                resume_deadline_s=self.resume_deadline_s,
                connect_timeout_s=self.connect_timeout_s,
                overload_retry_s=self.overload_retry_s,
                on_prefill=self._prefilled,
            )
            gen = generation.run()
            try:
                while True:
                    try:
                        if deadline is None:
                            delta = await gen.__anext__()
                        else:
                            # wait_for cancels the step on expiry; `run` then closes the session itself
                            delta = await asyncio.wait_for(
                                gen.__anext__(), max(0.0, deadline - time.monotonic())
                            )
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        raise TimeoutError(f"generation timed out after {timeout} s") from None
                    if delta:
                        yield delta
            finally:
                if (
                    generation.result is not None
                ):  # the loop reached its end (even if a timeout hit just then)
                    self.last_result = generation.result
                sess = generation.session
                self.server_decodes = server_decodes_next(
                    self.server_decodes, sess.moved_to_server, sess.handed_to_edge, sess.mode == "speculative"
                )
                # Runs `run`'s cleanup now, under the lock (not later from the garbage collector), so the
                # server session is closed before the next generation may start.
                await gen.aclose()

    def _prefilled(self, ms: float, tokens: int) -> None:
        """The draft's prompt prefill of a new generation took `ms` for `tokens` (on the draft's thread)."""
        if tokens > 0 and ms > 0.0:
            rate = ms / tokens
            last = self.prefill_ms_per_token
            self.prefill_ms_per_token = rate if last is None else 0.8 * last + 0.2 * rate

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """A string is tokenized as is; chat messages go through the bundle's template; ids pass through."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif prompt and all(isinstance(m, dict) for m in prompt):
            ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(prompt))  # type: ignore[arg-type]
        elif prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)  # type: ignore[arg-type]
        else:
            raise WispError("prompt must be a string, a list of chat messages, or a list of token ids")
        if not ids:
            raise WispError("the prompt is empty")
        return ids

    async def aclose(self) -> None:
        await self._transport.close()
        self._pool.shutdown(wait=False)

    async def warm_up(self, tokens: int = 64) -> float | None:
        """Run the draft once (ONNX Runtime's first run is slow) and time a prefill of `tokens` tokens, so that the
        first generation already knows the draft's prompt-prefill rate: without one, `start_on_server=None` offers
        on every first generation (`offers_start_on_server`). Returns ms per token (None without a draft: the
        centralized mode loads none). On an H200 bench, where every emulated device's first session offered, WISP
        started 600-1200 sessions a point on the server whose prefill (1-5 ms a token of a 60 ms budget) did not
        need it."""
        runner = self.runner
        if runner is None or tokens < 1:
            return None
        ids = [1 + i % max(1, self.manifest.vocab_size - 1) for i in range(tokens)]

        def run() -> float:
            runner.sync(ids[:2])  # the slow first run, untimed
            runner.reset()
            ms = runner.sync(ids)
            runner.reset()
            return ms

        ms = await asyncio.get_running_loop().run_in_executor(self._pool, run)
        self._prefilled(ms, tokens)
        return self.prefill_ms_per_token

    async def connect(self) -> None:
        """Connect and say Hello now (a generation otherwise connects on demand): a down server, a refused token
        or a tokenizer mismatch is reported here, as one `WispError`, instead of on the first generation."""
        try:
            if not self._transport.connected:
                await self._transport.connect()
        except LinkDown as exc:
            raise WispError(str(exc)) from exc

    async def __aenter__(self) -> AsyncEdgeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class EdgeClient:
    """Synchronous front: the same client, running its own event loop in a background thread."""

    def __init__(self, server: str, draft: str | Path, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wisp-client-loop", daemon=True)
        self._thread.start()
        self._client = AsyncEdgeClient(server, draft, **kwargs)

    @property
    def tokenizer(self) -> DraftTokenizer:
        return self._client.tokenizer

    @property
    def last_result(self) -> GenerationResult | None:
        return self._client.last_result

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """The token ids a prompt (string, chat messages or ids) is sent as."""
        return self._client.encode_prompt(prompt)

    def generate(self, prompt: Prompt, max_new_tokens: int = 256, **kwargs: Any) -> GenerationResult:
        """Same arguments as AsyncEdgeClient.generate."""
        fut = asyncio.run_coroutine_threadsafe(
            self._client.generate(prompt, max_new_tokens, **kwargs), self._loop
        )
        return fut.result()

    def warm_up(self, tokens: int = 64) -> float | None:
        """Same as AsyncEdgeClient.warm_up."""
        return asyncio.run_coroutine_threadsafe(self._client.warm_up(tokens), self._loop).result()

    def stream(self, prompt: Prompt, max_new_tokens: int = 256, **kwargs: Any) -> Iterator[str]:
        """Yield text deltas as they commit; `last_result` holds the full result afterwards."""
        q: queue.Queue = queue.Queue()
        done = object()

        async def pump() -> None:
            try:
                async for delta in self._client.stream(prompt, max_new_tokens, **kwargs):
                    q.put(delta)
            except BaseException as exc:  # hand every failure to the consuming thread
                q.put(exc)
            finally:
                q.put(done)

        fut = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not fut.done():  # the consumer left early: stop the generation (it closes the server session)
                fut.cancel()
                concurrent.futures.wait([fut], timeout=5)

    def close(self) -> None:
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
