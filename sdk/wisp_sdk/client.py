"""EdgeClient / AsyncEdgeClient: draft on the device, verify in the cloud, over one websocket.

The protocol state lives in `session.Session` (sans I/O); this module adds the socket, the timers, the draft
model and the reconnect policy (the socket, reconnects and a balancer's affinity cookie: transport.py). Drafting runs in a worker thread (ONNX Runtime releases the GIL), so the event
loop keeps answering pings and can notice a verdict while the device drafts ahead.

Resume policy: any connection failure (closed socket, refused connect, a response that does not come within
`response_timeout_s`) starts a resume clock. The client reconnects with exponential backoff, sends `Resume` and
re-sends the round in flight (the server answers a repeated round from its cache, so it is never applied
twice). If the server no longer knows the session, the client opens a new one with its committed tokens. If no
resume succeeds before `resume_deadline_s`, it raises `WispError`. An `Open` refused with `overloaded` is
retried on a new connection (behind a balancer: possibly another replica) for up to `overload_retry_s`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import ssl
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from wisp_sdk.bundle import load_manifest
from wisp_sdk.controllers import Action, Controller, LinkState, make_controller
from wisp_sdk.draft_runner import DraftRunner, DraftToken
from wisp_sdk.errors import ServerError, WispError
from wisp_sdk.predictor import RejectionPredictor
from wisp_sdk.protocol import (
    SLO,
    Closed,
    ErrorCode,
    Mode,
    Opened,
    SamplingParams,
    Switch,
    Tokens,
    Verdict,
    Welcome,
)
from wisp_sdk.session import GenerationRequest, Session
from wisp_sdk.stats import GenerationResult, GenerationStats, RoundStats
from wisp_sdk.tokenizer import DraftTokenizer
from wisp_sdk.transport import Backoff, LinkDown, SessionLost, Transport, tls_context

log = logging.getLogger("wisp.client")

Prompt = str | list[dict[str, Any]] | list[int]


def _noop() -> None:
    return None


def _ema(old: float, new: float, w: float = 0.3) -> float:
    return (1 - w) * old + w * new


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
        request = GenerationRequest(
            prompt_ids=self.encode_prompt(prompt),
            max_new_tokens=max_new_tokens,
            sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
            slo=slo or self.slo,
            stop=[stop] if isinstance(stop, str) else list(stop or []),
            mode=self.mode,
        )
        ctl = make_controller(controller or self.controller_spec, self.predictor)
        if self._lock is None:
            self._lock = asyncio.Lock()
        deadline = None if timeout is None else time.monotonic() + timeout
        async with self._lock:
            gen = self._run(request, ctl)
            try:
                while True:
                    try:
                        if deadline is None:
                            delta = await gen.__anext__()
                        else:
                            # wait_for cancels the step on expiry; `_run` then closes the session itself
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
                # Runs `_run`'s cleanup now, under the lock (not later from the garbage collector), so the
                # server session is closed before the next generation may start.
                await gen.aclose()

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

    # ---- the generation loop ----

    async def _run(self, req: GenerationRequest, ctl: Controller) -> AsyncGenerator[str, None]:
        loop = asyncio.get_running_loop()
        stats = GenerationStats(mode=req.mode, controller=ctl.name if req.mode == "speculative" else "")
        stats.prompt_tokens = len(req.prompt_ids)
        sess = Session(req, self.manifest.eos_token_ids, self.tokenizer)
        rng = np.random.default_rng(req.sampling.seed)
        t_start = time.perf_counter()
        deadline: float | None = None  # resume clock, running only while the link is down
        need_open, need_send = True, False
        refused_until: float | None = None  # overload retry clock, running only while Opens are refused
        overload_backoff = Backoff(self.backoff_initial_s, self.backoff_max_s)
        predrafted: list[DraftToken] = []
        link = LinkState()
        finished = False
        try:
            while True:
                try:
                    if need_open:
                        if not self._transport.connected:
                            await self._transport.connect()
                        await self._transport.send(sess.open_message())
                        if self.runner is not None and req.mode == "speculative":  # prefill the draft too
                            self._pool.submit(self.runner.sync, sess.context)  # FIFO: before any round
                        opened, _ = await self._transport.recv_expect(sess, Opened)
                        delta = sess.on_opened(opened)
                        need_open, need_send, predrafted = False, False, []
                        refused_until, overload_backoff = (
                            None,
                            Backoff(self.backoff_initial_s, self.backoff_max_s),
                        )
                        if not stats.ttft_ms:
                            stats.ttft_ms = (time.perf_counter() - t_start) * 1000.0
                        link.rtt_ms = self._transport.rtt_ms
                        link.wait_hint_ms = opened.wait_hint_ms
                        if self.welcome is not None:
                            link.max_draft = self.welcome.limits.max_draft_len
                        deadline = None
                        yield delta
                        continue
                    if sess.done:
                        break
                    if sess.mode == "centralized" or sess.behind:
                        # Server-side decoding (asked for, or switched to by the server): tokens stream in until
                        # the end or a Switch back; then the next round's sync catches the draft's KV up.
                        msg, _ = await self._transport.recv_expect(sess, (Tokens, Switch))
                        deadline = None
                        if isinstance(msg, Switch):
                            sess.on_switch(msg)
                            stats.switches = sess.switches
                            link.launch_in_ms = 0.0  # the last verdict's launch is long past
                            predrafted = []
                            continue
                        yield sess.on_tokens(msg)
                        continue
                    rs: RoundStats | None = None
                    if sess.inflight is None:
                        ctl.start_round(link)
                        t0 = time.perf_counter()
                        kept, dropped = await loop.run_in_executor(
                            self._pool, self._draft_round, sess, ctl, predrafted, link, rng
                        )
                        draft_ms = (time.perf_counter() - t0) * 1000.0
                        predrafted = []
                        sess.make_round(kept)
                        rs = RoundStats(
                            round=sess.round_no,
                            drafted=len(kept),
                            accepted=0,
                            committed=0,
                            dropped=len(dropped),
                        )
                        rs.draft_ms = draft_ms
                        need_send = True
                        kept_all = kept + dropped
                    else:
                        kept_all = list(sess.inflight_tokens)
                        rs = RoundStats(
                            round=sess.round_no, drafted=len(kept_all), accepted=0, committed=0, resent=True
                        )
                    if need_send:
                        await self._transport.send(sess.inflight)
                        need_send = False
                    t_sent = time.perf_counter()
                    verdict, arrived, ahead, ahead_ms = await self._await_verdict(sess, ctl, rng)
                    sent_tokens = list(sess.inflight_tokens)
                    before = len(sess.generated)
                    applied = sess.on_verdict(verdict)
                    if applied is None:
                        continue
                    accepted, delta = applied
                    deadline = None
                    # Only the verified prefix was judged: an unverified tail is no rejection to learn from.
                    ctl.observe(sent_tokens[: len(sent_tokens) - verdict.unverified], accepted)
                    link.price_ms = verdict.price_ms
                    link.launch_in_ms = verdict.launch_in_ms
                    stats.switches = sess.switches
                    # Draft ahead pays off only if the verifier took every draft and its token is our first guess.
                    if (
                        ahead
                        and accepted == len(sent_tokens)
                        and verdict.next_token == ahead[0].token
                        and not sess.done
                        and sess.mode == "speculative"
                    ):
                        predrafted = ahead[1:]
                        rs.ahead_used = len(ahead)
                    rs.ahead = len(ahead)
                    rs.accepted = accepted
                    rs.committed = len(sess.generated) - before
                    rs.wait_ms = (arrived - t_sent) * 1000.0
                    rs.idle_ms = max(0.0, rs.wait_ms - ahead_ms)
                    rs.queue_ms, rs.verify_ms, rs.wait_hint_ms = (
                        verdict.queue_ms,
                        verdict.verify_ms,
                        verdict.wait_hint_ms,
                    )
                    rs.price_ms, rs.unverified = verdict.price_ms, verdict.unverified
                    wasted_draft = sum(t.ms for i, t in enumerate(kept_all) if i >= max(accepted, 1))
                    rs.wasted_ms = wasted_draft + rs.idle_ms + (0.0 if rs.ahead_used else ahead_ms)
                    stats.rounds.append(rs)
                    self._update_link(link, rs, kept_all)
                    yield delta
                except SessionLost:
                    sess.lost()
                    stats.reopened += 1
                    need_open, predrafted = True, []
                except ServerError as exc:
                    if exc.code != ErrorCode.overloaded.value or sess.session_id is not None:
                        raise
                    # A refused Open is not final: retry on a new connection without the affinity cookie (a
                    # balancer may pick another replica) until overload_retry_s has passed.
                    now = time.monotonic()
                    if refused_until is None:
                        refused_until = now + self.overload_retry_s
                    wait = overload_backoff.next_s()
                    if now + wait > refused_until:
                        raise
                    log.info("session refused (%s); retrying in %.2fs", exc.message, wait)
                    stats.refused += 1
                    self._transport.forget_replica()
                    await asyncio.sleep(wait)
                    need_open, predrafted = True, []
                except LinkDown as exc:
                    log.info("connection lost (%s); resuming", exc)
                    if deadline is None:
                        # A session that never opened has nothing to resume: a down server fails within the
                        # connect timeout; a link that drops mid-generation gets the resume deadline.
                        window = self.connect_timeout_s if sess.session_id is None else self.resume_deadline_s
                        deadline = time.monotonic() + window
                    stats.reconnects += 1
                    outcome = await self._transport.recover(sess, deadline, exc, self.resume_deadline_s)
                    predrafted = []
                    if outcome == "reopen":
                        if sess.session_id is not None:
                            stats.reopened += 1
                        sess.lost()
                        need_open = True
                    else:
                        need_send = sess.inflight is not None
            stats.new_tokens = len(sess.generated)
            stats.total_ms = (time.perf_counter() - t_start) * 1000.0
            # Tell the server we're done (it frees the KV now instead of at the TTL); never fail the result over it.
            close = sess.close_message()
            if close is not None and self._transport.connected:
                with contextlib.suppress(Exception):
                    await self._transport.send(close)
                    await asyncio.wait_for(self._transport.recv_expect(sess, Closed), 2.0)
            stats.finish_reason = sess.finish_reason
            self.last_result = GenerationResult(
                text=sess.text, token_ids=list(sess.generated), stats=stats, finish_reason=sess.finish_reason
            )
            finished = True
        finally:
            if not finished:  # the consumer left, the task was cancelled or timed out: free the server now
                await self._abandon(sess)

    async def _abandon(self, sess: Session) -> None:
        """A generation stopped early: let the draft thread finish its step (the draft model's cache is shared by
        the next generation), then close the server session so it frees the KV at once, and wait for `Closed`
        so no late frame of it reaches the next generation. A link that does not answer within a second is
        dropped instead (the server then frees the session at its TTL)."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(BaseException):
            await loop.run_in_executor(self._pool, _noop)  # FIFO: runs after the drafting step in flight
        close = sess.close_message()
        if close is None or not self._transport.connected:
            return
        try:
            await asyncio.wait_for(self._transport.close_session(close), 1.0)
        except BaseException:
            self._transport.drop()

    def _update_link(self, link: LinkState, rs: RoundStats, tokens: list[DraftToken]) -> None:
        server_ms = rs.queue_ms + rs.verify_ms
        if not rs.ahead:  # with drafting ahead, arrival is only noticed between draft steps
            link.rtt_ms = _ema(link.rtt_ms, max(0.0, rs.wait_ms - server_ms))
        link.verify_ms = _ema(link.verify_ms, rs.verify_ms)
        link.wait_hint_ms = rs.wait_hint_ms
        per_token = [t.ms for t in tokens[1:] if t.ms > 0]
        if per_token:
            link.draft_ms = _ema(link.draft_ms, float(np.mean(per_token)))

    def _draft_round(
        self,
        sess: Session,
        ctl: Controller,
        predrafted: list[DraftToken],
        link: LinkState,
        rng: np.random.Generator,
    ) -> tuple[list[DraftToken], list[DraftToken]]:
        """Draft one round under the controller; returns (tokens to send, tokens withheld). Worker thread."""
        assert self.runner is not None
        ctx = sess.context
        remaining = sess.request.max_new_tokens - len(sess.generated)
        # The verdict always adds one token, so never draft what max_new_tokens would cut anyway; and never past
        # the server's context limit (context + draft may not exceed it: `too_large`).
        room = remaining - 1
        if self.welcome is not None:
            room = min(room, self.welcome.limits.max_context_len - len(ctx))
        limit = max(0, min(room, link.max_draft, ctl.max_draft))
        eos = set(self.manifest.eos_token_ids)
        kept: list[DraftToken] = []
        while len(kept) < limit:
            if len(kept) < len(predrafted):
                tok = predrafted[len(kept)]
            else:
                ms = self.runner.sync(ctx + [t.token for t in kept])
                tok = self.runner.propose(sess.request.sampling, rng)
                tok.ms = ms
            action = ctl.step([*kept, tok])
            if action is Action.DROP:
                return kept, [tok]
            kept.append(tok)
            if action is Action.SEND or tok.token in eos:  # nothing follows an EOS
                break
        return kept, []

    async def _await_verdict(
        self, sess: Session, ctl: Controller, rng: np.random.Generator
    ) -> tuple[Verdict, float, list[DraftToken], float]:
        """Wait for the verdict, drafting ahead meanwhile if the controller asks for it."""
        budget = ctl.ahead_budget() if self.runner is not None else 0
        if not budget or sess.inflight is None or not sess.inflight.draft_ids:
            verdict, arrived = await self._transport.recv_expect(sess, Verdict)
            return verdict, arrived, [], 0.0
        loop = asyncio.get_running_loop()
        recv = asyncio.create_task(self._transport.recv_expect(sess, Verdict))
        base = sess.context + list(sess.inflight.draft_ids)
        ahead: list[DraftToken] = []
        ahead_ms = 0.0
        try:
            while not recv.done() and len(ahead) < budget:
                t0 = time.perf_counter()
                tok = await loop.run_in_executor(
                    self._pool, self._ahead_step, base, ahead, sess.request.sampling, rng
                )
                ahead_ms += (time.perf_counter() - t0) * 1000.0
                ahead.append(tok)
                if tok.token in set(self.manifest.eos_token_ids):
                    break
            verdict, arrived = await recv
        finally:
            if not recv.done():
                recv.cancel()
        return verdict, arrived, ahead, ahead_ms

    def _ahead_step(
        self, base: list[int], ahead: list[DraftToken], sampling: SamplingParams, rng: np.random.Generator
    ) -> DraftToken:
        assert self.runner is not None
        ms = self.runner.sync(base + [t.token for t in ahead])
        tok = self.runner.propose(sampling, rng)
        tok.ms = ms
        return tok


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
