"""Generation: one request's speculative loop, the I/O front over `session.Session` (sans I/O).

`AsyncEdgeClient.stream` builds one per request and drives `run`; this module adds to the session the socket
(`transport.Transport`), the timers, the draft model and the reconnect policy. Drafting runs in the client's
worker thread (ONNX Runtime releases the GIL), so the event loop keeps answering pings and can notice a verdict
while the device drafts ahead.

Resume policy: any connection failure (closed socket, refused connect, a response that does not come within
`response_timeout_s`) starts a resume clock. The client reconnects with exponential backoff, sends `Resume` and
re-sends the round in flight (the server answers a repeated round from its cache, so it is never applied
twice). If the server no longer knows the session, the client opens a new one with its committed tokens. If no
resume succeeds before `resume_deadline_s`, it raises `WispError`. An `Open` refused with `overloaded` is
retried on a new connection (behind a balancer: possibly another replica) for up to `overload_retry_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from wisp_sdk.controllers import Action, Controller, LinkState
from wisp_sdk.draft_runner import DraftRunner, DraftToken
from wisp_sdk.errors import ServerError
from wisp_sdk.protocol import Closed, ErrorCode, Opened, SamplingParams, Switch, Tokens, Verdict
from wisp_sdk.session import GenerationRequest, Session
from wisp_sdk.stats import GenerationResult, GenerationStats, RoundStats
from wisp_sdk.tokenizer import DraftTokenizer
from wisp_sdk.transport import LinkDown, SessionLost, Transport

log = logging.getLogger("wisp.client")


def _noop() -> None:
    return None


def _ema(old: float, new: float, w: float = 0.3) -> float:
    return (1 - w) * old + w * new


class Generation:
    """One request from `Open` to `Close`: `run` yields text deltas as tokens commit; `result` holds the outcome
    once the loop has ended (None while it runs, and after a generation stopped early)."""

    def __init__(
        self,
        request: GenerationRequest,
        controller: Controller,
        *,
        transport: Transport,
        runner: DraftRunner | None,
        pool: ThreadPoolExecutor,
        eos_token_ids: list[int],
        tokenizer: DraftTokenizer,
        resume_deadline_s: float,
        connect_timeout_s: float,
        overload_retry_s: float,
        on_prefill: Callable[[float, int], None] | None = None,
    ) -> None:
        self.request = request
        self.on_prefill = on_prefill  # (ms, tokens) of the draft's prompt prefill, on the draft's thread
        self.ctl = controller
        self.transport = transport
        self.runner = runner
        self.pool = pool  # the client's one drafting thread: FIFO, shared by every generation of the client
        self.eos_token_ids = eos_token_ids
        self.resume_deadline_s = resume_deadline_s
        self.connect_timeout_s = connect_timeout_s
        self.overload_retry_s = overload_retry_s
        self.result: GenerationResult | None = None
        mode = request.mode
        self.stats = GenerationStats(mode=mode, controller=controller.name if mode == "speculative" else "")
        self.stats.prompt_tokens = len(request.prompt_ids)
        self.session = Session(request, eos_token_ids, tokenizer)
        self.rng = np.random.default_rng(request.sampling.seed)
        self.t_start = 0.0  # set when `run` starts
        self.resume_by: float | None = None  # resume clock, running only while the link is down
        self.need_open, self.need_send = True, False
        self.refused_until: float | None = None  # overload retry clock, running only while Opens are refused
        self.overload_backoff = transport.backoff()
        self.predrafted: list[DraftToken] = []
        self.link = LinkState()

    async def run(self) -> AsyncGenerator[str, None]:
        sess = self.session
        self.t_start = time.perf_counter()
        finished = False
        try:
            while True:
                try:
                    if self.need_open:
                        delta = await self._open()
                        yield delta
                        continue
                    if sess.done:
                        break
                    if sess.mode == "centralized" or sess.behind:
                        tokens = await self._follow_server()
                        if tokens is not None:
                            yield tokens
                        continue
                    verified = await self._round()
                    if verified is not None:
                        yield verified
                except SessionLost:
                    sess.lost()
                    self.stats.reopened += 1
                    self.need_open, self.predrafted = True, []
                except ServerError as exc:
                    if not await self._retry_refused(exc):
                        raise
                except LinkDown as exc:
                    await self._recover(exc)
            await self._finish()
            finished = True
        finally:
            if not finished:  # the consumer left, the task was cancelled or timed out: free the server now
                await self._abandon()

    # ---- the loop's steps ----

    async def _open(self) -> str:
        """Open (or rebuild) the server session; returns the first committed token's text."""
        sess, link = self.session, self.link
        if not self.transport.connected:
            await self.transport.connect()
        await self.transport.send(sess.open_message())
        if self.runner is not None and self.request.mode == "speculative":  # prefill the draft too
            fut = self.pool.submit(self.runner.sync, sess.context)  # FIFO: before any round
            report, n = self.on_prefill, len(sess.context)
            # the prompt's own prefill, not a rebuild's catch-up
            if report is not None and not sess.generated:

                def timed(f: Future[float]) -> None:
                    if not f.cancelled() and f.exception() is None:
                        report(f.result(), n)

                fut.add_done_callback(timed)
        opened, _ = await self.transport.recv_expect(sess, Opened)
        delta = sess.on_opened(opened)
        self.need_open, self.need_send, self.predrafted = False, False, []
        self.refused_until, self.overload_backoff = None, self.transport.backoff()
        if not self.stats.ttft_ms:
            self.stats.ttft_ms = (time.perf_counter() - self.t_start) * 1000.0
        link.rtt_ms = self.transport.rtt_ms
        link.wait_hint_ms = opened.wait_hint_ms
        welcome = self.transport.welcome
        if welcome is not None:
            link.limit = link.max_draft = welcome.limits.max_draft_len
        self.resume_by = None
        return delta

    async def _follow_server(self) -> str | None:
        """Server-side decoding (asked for, or switched to by the server): tokens stream in until the end or a
        Switch back (None); then the next round's sync catches the draft's KV up."""
        sess = self.session
        msg, _ = await self.transport.recv_expect(sess, (Tokens, Switch))
        self.resume_by = None
        if isinstance(msg, Switch):
            sess.on_switch(msg)
            self.stats.switches = sess.switches
            self.link.launch_in_ms = 0.0  # the last verdict's launch is long past
            self.predrafted = []
            return None
        return sess.on_tokens(msg)

    async def _round(self) -> str | None:
        """Draft (or re-send) a round and apply its verdict; None when the verdict was not for this round."""
        sess, ctl, link = self.session, self.ctl, self.link
        loop = asyncio.get_running_loop()
        rs: RoundStats | None = None
        if sess.inflight is None:
            ctl.start_round(link)
            t0 = time.perf_counter()
            kept, dropped = await loop.run_in_executor(self.pool, self._draft_round, self.predrafted)
            draft_ms = (time.perf_counter() - t0) * 1000.0
            self.predrafted = []
            sess.make_round(kept, min(ctl.siblings(kept), self._siblings()))
            rs = RoundStats(
                round=sess.round_no,
                drafted=len(kept),
                accepted=0,
                committed=0,
                dropped=len(dropped),
            )
            rs.draft_ms = draft_ms
            self.need_send = True
            kept_all = kept + dropped
        else:
            kept_all = list(sess.inflight_tokens)
            rs = RoundStats(round=sess.round_no, drafted=len(kept_all), accepted=0, committed=0, resent=True)
        if self.need_send:
            await self.transport.send(sess.inflight)
            self.need_send = False
        t_sent = time.perf_counter()
        verdict, arrived, ahead, ahead_ms = await self._await_verdict()
        sent_tokens = list(sess.inflight_tokens)
        n_sib = len(sess.inflight.sibling_ids) if sess.inflight is not None else 0
        before = len(sess.generated)
        applied = sess.on_verdict(verdict)
        if applied is None:
            return None
        accepted, delta = applied
        self.resume_by = None
        # Only the verified prefix was judged: an unverified tail is no rejection to learn from.
        ctl.observe(sent_tokens[: len(sent_tokens) - verdict.unverified], accepted)
        if accepted < min(n_sib, len(sent_tokens) - verdict.unverified):  # its draft token was rejected
            ctl.observe_sibling(verdict.sibling)
        rs.siblings, rs.sibling = n_sib, verdict.sibling
        link.price_ms = verdict.price_ms
        link.launch_in_ms = verdict.launch_in_ms
        # the server's cap on the next round (its regime's best draft length under load), never above the limit;
        # a verdict without one lifts the last
        link.max_draft = min(link.limit, verdict.draft_cap) if verdict.draft_cap else link.limit
        self.stats.switches = sess.switches
        # Draft ahead pays off only if the verifier took every draft and its token is our first guess.
        if (
            ahead
            and accepted == len(sent_tokens)
            and verdict.next_token == ahead[0].token
            and not sess.done
            and sess.mode == "speculative"
        ):
            self.predrafted = ahead[1:]
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
        self.stats.rounds.append(rs)
        self._update_link(rs, kept_all)
        return delta

    async def _retry_refused(self, exc: ServerError) -> bool:
        """A refused Open is not final: retry on a new connection without the affinity cookie (a balancer may
        pick another replica) until overload_retry_s has passed. False: the error is final."""
        if exc.code != ErrorCode.overloaded.value or self.session.session_id is not None:
            return False
        now = time.monotonic()
        if self.refused_until is None:
            self.refused_until = now + self.overload_retry_s
        wait = self.overload_backoff.next_s()
        if now + wait > self.refused_until:
            return False
        log.info("session refused (%s); retrying in %.2fs", exc.message, wait)
        self.stats.refused += 1
        self.transport.forget_replica()
        await asyncio.sleep(wait)
        self.need_open, self.predrafted = True, []
        return True

    async def _recover(self, exc: LinkDown) -> None:
        sess = self.session
        log.info("connection lost (%s); resuming", exc)
        if self.resume_by is None:
            # A session that never opened has nothing to resume: a down server fails within the connect
            # timeout; a link that drops mid-generation gets the resume deadline.
            window = self.connect_timeout_s if sess.session_id is None else self.resume_deadline_s
            self.resume_by = time.monotonic() + window
        self.stats.reconnects += 1
        outcome = await self.transport.recover(sess, self.resume_by, exc, self.resume_deadline_s)
        self.predrafted = []
        if outcome == "reopen":
            if sess.session_id is not None:
                self.stats.reopened += 1
            sess.lost()
            self.need_open = True
        else:
            self.need_send = sess.inflight is not None
            self.stats.switches = sess.switches  # a switch made while the link was down (Session.on_resumed)

    async def _finish(self) -> None:
        sess, stats = self.session, self.stats
        stats.new_tokens = len(sess.generated)
        stats.total_ms = (time.perf_counter() - self.t_start) * 1000.0
        # Tell the server we're done (it frees the KV now instead of at the TTL); never fail the result over it.
        close = sess.close_message()
        if close is not None and self.transport.connected:
            with contextlib.suppress(Exception):
                await self.transport.send(close)
                await asyncio.wait_for(self.transport.recv_expect(sess, Closed), 2.0)
        stats.finish_reason = sess.finish_reason
        self.result = GenerationResult(
            text=sess.text, token_ids=list(sess.generated), stats=stats, finish_reason=sess.finish_reason
        )

    async def _abandon(self) -> None:
        """A generation stopped early: let the draft thread finish its step (the draft model's cache is shared by
        the next generation), then close the server session so it frees the KV at once, and wait for `Closed`
        so no late frame of it reaches the next generation. A link that does not answer within a second is
        dropped instead (the server then frees the session at its TTL)."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(BaseException):
            await loop.run_in_executor(self.pool, _noop)  # FIFO: runs after the drafting step in flight
        close = self.session.close_message()
        if close is None or not self.transport.connected:
            return
        try:
            await asyncio.wait_for(self.transport.close_session(close), 1.0)
        except BaseException:
            self.transport.drop()

    def _update_link(self, rs: RoundStats, tokens: list[DraftToken]) -> None:
        link = self.link
        server_ms = rs.queue_ms + rs.verify_ms
        if not rs.ahead:  # with drafting ahead, arrival is only noticed between draft steps
            link.rtt_ms = _ema(link.rtt_ms, max(0.0, rs.wait_ms - server_ms))
        link.verify_ms = _ema(link.verify_ms, rs.verify_ms)
        link.wait_hint_ms = rs.wait_hint_ms
        per_token = [t.ms for t in tokens[1:] if t.ms > 0]
        if per_token:
            link.draft_ms = _ema(link.draft_ms, float(np.mean(per_token)))

    # ---- drafting (worker thread) ----

    def _siblings(self) -> int:
        """The most siblings a round may carry: the controller's tree, as far as the server verifies them."""
        welcome = self.transport.welcome
        return min(self.ctl.tree, welcome.limits.max_siblings if welcome is not None else 0)

    def _draft_round(self, predrafted: list[DraftToken]) -> tuple[list[DraftToken], list[DraftToken]]:
        """Draft one round under the controller; returns (tokens to send, tokens withheld). Worker thread."""
        assert self.runner is not None
        sess, ctl = self.session, self.ctl
        ctx = sess.context
        remaining = sess.request.max_new_tokens - len(sess.generated)
        # The verdict always adds one token, so never draft what max_new_tokens would cut anyway; and never past
        # the server's context limit (context + draft may not exceed it: `too_large`).
        room = remaining - 1
        welcome = self.transport.welcome
        if welcome is not None:
            room = min(room, welcome.limits.max_context_len - len(ctx))
        limit = max(0, min(room, self.link.max_draft, ctl.max_draft))
        eos = set(self.eos_token_ids)
        kept: list[DraftToken] = []
        while len(kept) < limit:
            if len(kept) < len(predrafted):
                tok = predrafted[len(kept)]
            else:
                ms = self.runner.sync(ctx + [t.token for t in kept])
                tok = self.runner.propose(sess.request.sampling, self.rng, alt=len(kept) < self._siblings())
                tok.ms = ms
            action = ctl.step([*kept, tok])
            if action is Action.DROP:
                return kept, [tok]
            kept.append(tok)
            if action is Action.SEND or tok.token in eos:  # nothing follows an EOS
                break
        return kept, []

    async def _await_verdict(self) -> tuple[Verdict, float, list[DraftToken], float]:
        """Wait for the verdict, drafting ahead meanwhile if the controller asks for it."""
        sess = self.session
        budget = self.ctl.ahead_budget() if self.runner is not None else 0
        if not budget or sess.inflight is None or not sess.inflight.draft_ids:
            verdict, arrived = await self.transport.recv_expect(sess, Verdict)
            return verdict, arrived, [], 0.0
        loop = asyncio.get_running_loop()
        recv = asyncio.create_task(self.transport.recv_expect(sess, Verdict))
        base = sess.context + list(sess.inflight.draft_ids)
        ahead: list[DraftToken] = []
        ahead_ms = 0.0
        try:
            while not recv.done() and len(ahead) < budget:
                t0 = time.perf_counter()
                tok = await loop.run_in_executor(
                    self.pool, self._ahead_step, base, ahead, sess.request.sampling
                )
                ahead_ms += (time.perf_counter() - t0) * 1000.0
                ahead.append(tok)
                if tok.token in set(self.eos_token_ids):
                    break
            verdict, arrived = await recv
        finally:
            if not recv.done():
                recv.cancel()
        return verdict, arrived, ahead, ahead_ms

    def _ahead_step(self, base: list[int], ahead: list[DraftToken], sampling: SamplingParams) -> DraftToken:
        assert self.runner is not None
        ms = self.runner.sync(base + [t.token for t in ahead])
        tok = self.runner.propose(sampling, self.rng, alt=len(ahead) < self._siblings())
        tok.ms = ms
        return tok
