"""The websocket gateway and the batching loop.

Connections only parse, check and enqueue; all model work happens in ONE batching loop task, which takes what
the policy selects from every session's waiting job, runs it as one ragged batch on a worker thread, applies
acceptance, and answers each job's session. So sessions share forward passes without sharing any state, and a
bad frame is answered on its own connection without reaching the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State
from wisp_sdk.errors import ProtocolError, WispError
from wisp_sdk.protocol import (
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    Close,
    Closed,
    Error,
    ErrorCode,
    Hello,
    Limits,
    Open,
    Opened,
    Resume,
    Resumed,
    Round,
    Tokens,
    Verdict,
    Welcome,
    decode_client,
    encode,
)

from wisp_cloud.acceptance import DraftError, accept_greedy, accept_sampling, dense_q, sample_token
from wisp_cloud.backends.base import Backend, BatchStats, ItemResult, WorkItem
from wisp_cloud.config import ServerConfig, is_loopback
from wisp_cloud.deadlines import SessionDeadlines
from wisp_cloud.estimator import ItemShape, VerifyTimeEstimator
from wisp_cloud.jobs import Job, JobKind
from wisp_cloud.metrics import Metrics, log_event
from wisp_cloud.policy import Policy, make_policy
from wisp_cloud.sessions import Session, SessionLimitError, SessionStore, owner_key
from wisp_cloud.slo_metrics import SLOMetrics

log = logging.getLogger("wisp.server")

_HOUSEKEEPING_S = 1.0
_MIN_SLEEP_S = 0.0005  # shortest wait after an empty selection


class Refusal(Exception):
    """A request answered with an Error frame of `code`; `fatal` closes the connection afterwards."""

    def __init__(self, code: ErrorCode, message: str, *, session_id=None, round=None, fatal=False) -> None:
        super().__init__(message)
        self.code, self.message, self.session_id, self.round, self.fatal = (
            code,
            message,
            session_id,
            round,
            fatal,
        )


class InjectedFault(RuntimeError):
    """Raised by the debug fault hook (ServerConfig.fault_token)."""


@dataclass(eq=False)
class Connection:
    ws: ServerConnection
    header_token: str | None
    owner: str | None = None  # set by a successful Hello
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    bytes_in: int = 0
    bytes_out: int = 0

    def send(self, msg: BaseModel) -> None:
        """Queue a frame; one writer task per connection keeps order and never blocks the batching loop."""
        self.outbox.put_nowait(encode(msg))


@dataclass
class _Planned:
    job: Job
    item: WorkItem
    final: bool  # carries the draft and gets logits: the job completes with this batch
    cached_before: int


@dataclass
class _Outcome:
    planned: _Planned
    result: ItemResult | None = None
    accepted: int = 0
    next_token: int = -1
    error: str | None = None


class WispServer:
    def __init__(
        self,
        backend: Backend,
        config: ServerConfig,
        policy: Policy | None = None,
        estimator: VerifyTimeEstimator | None = None,
    ) -> None:
        self.backend = backend
        self.cfg = config
        # Verify-time estimator: refined online from every batch that runs (exact item shapes); shared with an
        # SLO-aware policy, and the solo-time reference of the interference metric.
        self.estimator = estimator or getattr(policy, "est", None) or VerifyTimeEstimator.default()
        self.policy = policy or make_policy(
            config.policy,
            self.estimator,
            max_batch=config.max_batch,
            prefill_chunk=config.prefill_chunk,
            admission_target=config.admission_target,
        )
        self.slo = SLOMetrics(started=time.monotonic())
        self.metrics = Metrics()
        limit = min(config.max_context_len, config.kv_budget_tokens)
        max_pos = getattr(backend, "max_positions", None)
        self.max_context_len = min(limit, max_pos) if max_pos else limit
        self.store = SessionStore(
            kv_budget_tokens=config.kv_budget_tokens,
            ttl_s=config.session_ttl_s,
            max_sessions=config.max_sessions,
            max_sessions_per_token=config.max_sessions_per_token,
            cached_len=backend.cached_len,
            release=backend.release,
        )
        self.limits = Limits(
            max_frame_bytes=config.max_frame_bytes,
            max_draft_len=config.max_draft_len,
            max_context_len=self.max_context_len,
            max_sessions_per_token=config.max_sessions_per_token,
        )
        self._waiting: list[Job] = []
        # KV of sessions closed by a connection handler: freed by the loop between forward passes, because the
        # backend is only ever touched by the loop (a forward may be running on the worker thread right now).
        self._to_release: list[str] = []
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wisp-forward")
        self._server: Server | None = None
        self._loop_task: asyncio.Task | None = None
        self._last_housekeeping = 0.0
        self._steps: list[
            tuple[int, int, float, float]
        ] = []  # (batch, tokens, forward_s, step_s) since last log
        self._steps_logged = time.monotonic()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._eos = frozenset(backend.eos_token_ids)

    # ---- lifecycle ----

    async def start(self) -> None:
        cfg = self.cfg
        if not cfg.auth_tokens:
            if not is_loopback(cfg.host):
                raise WispError(
                    f"refusing to serve on {cfg.host} without auth tokens; "
                    "give --auth-tokens FILE or WISP_AUTH_TOKENS, or bind 127.0.0.1"
                )
            log.warning(
                "no auth tokens configured: development mode, loopback only, anyone local may connect"
            )
        ssl_ctx = None
        if cfg.tls_cert or cfg.tls_key:
            if not (cfg.tls_cert and cfg.tls_key):
                raise WispError("TLS needs both --tls-cert and --tls-key")
            ssl_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                ssl_ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise WispError(f"cannot load TLS certificate/key: {exc}") from exc
        try:
            self._server = await serve(
                self._handle,
                cfg.host,
                cfg.port,
                ssl=ssl_ctx,
                # Hard cap well above our own limit, so a merely too-large frame still gets a too_large Error.
                max_size=4 * cfg.max_frame_bytes,
                compression=None,  # frames are already compact binary; deflate only adds latency
                select_subprotocol=lambda _conn, offered: SUBPROTOCOL if SUBPROTOCOL in offered else None,
                server_header="wisp-cloud",
            )
        except OSError as exc:
            raise WispError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from exc
        self._loop_task = asyncio.create_task(self._batch_loop(), name="wisp-batch-loop")
        self.port = self._server.sockets[0].getsockname()[1]
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(cfg.metrics_port, cfg.metrics_host)
        log_event(
            log,
            "server_start",
            url=self.url,
            policy=self.policy.name,
            max_batch=cfg.max_batch,
            kv_budget_tokens=cfg.kv_budget_tokens,
            max_context_len=self.max_context_len,
            metrics_port=self.metrics_port,
        )

    @property
    def url(self) -> str:
        return f"{self.cfg.scheme}://{self.cfg.host}:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        self._executor.shutdown(wait=True)
        self.metrics.close()
        log_event(log, "server_stop", sessions=len(self.store))

    def stats(self) -> dict:
        """A snapshot for tests and the CLI's --json output."""
        slo = self._slo_summary(time.monotonic())
        return {
            "policy": self.policy.name,
            "sessions": len(self.store),
            "queued": len(self._waiting),
            "batch_sizes": dict(self.metrics.batch_size_tally),
            "evictions": self.store.evictions,
            "expired": self.store.expired,
            "kv_tokens": self.store.kv_tokens(),
            "slo": slo,
            "estimator_correction": self.estimator.correction,
            "policy_counters": dict(getattr(self.policy, "counters", {}) or {}),
        }

    def _slo_summary(self, now: float) -> dict[str, float]:
        summary = self.slo.summary(now, include_live=True)
        self.metrics.set_slo(summary)
        return summary

    # ---- connections ----

    async def _handle(self, ws: ServerConnection) -> None:
        auth = ws.request.headers.get("Authorization") if ws.request else None
        header_token = auth[7:].strip() if auth and auth[:7].lower() == "bearer " else None
        conn = Connection(ws, header_token)
        writer = asyncio.create_task(self._writer(conn))
        close_reason: str | None = None
        try:
            async for frame in ws:
                conn.bytes_in += len(frame)
                close_reason = await self._on_frame(conn, frame)
                if close_reason:
                    break
        except ConnectionClosed:
            pass
        finally:
            for session in self.store:
                if session.conn is conn:
                    session.conn = None  # the session lives on until its TTL: the client may resume it
            conn.outbox.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed, TimeoutError):
                await asyncio.wait_for(
                    writer, timeout=5
                )  # flush what was queued (e.g. the fatal Error frame)
            if close_reason:
                with contextlib.suppress(ConnectionClosed):
                    await ws.close(1008, close_reason)  # 1008: policy violation

    async def _writer(self, conn: Connection) -> None:
        while True:
            data = await conn.outbox.get()
            if data is None:
                return
            try:
                await conn.ws.send(data)
                conn.bytes_out += len(data)
            except ConnectionClosed:
                return

    async def _on_frame(self, conn: Connection, frame: str | bytes) -> str | None:
        """Handle one frame; returns a close reason when the connection must be closed."""
        try:
            if len(frame) > self.cfg.max_frame_bytes:
                raise Refusal(
                    ErrorCode.too_large, f"frame of {len(frame)} bytes (limit {self.cfg.max_frame_bytes})"
                )
            try:
                msg = decode_client(frame)
            except ProtocolError as exc:
                raise Refusal(ErrorCode.bad_request, str(exc)) from exc
            if isinstance(msg, Hello):
                self._on_hello(conn, msg)
            elif conn.owner is None:
                raise Refusal(ErrorCode.bad_request, "send hello first")
            elif isinstance(msg, Round):
                self._on_round(conn, msg)
            elif isinstance(msg, Open):
                self._on_open(conn, msg)
            elif isinstance(msg, Resume):
                self._on_resume(conn, msg)
            elif isinstance(msg, Close):
                self._on_close(conn, msg)
        except Refusal as ref:
            self._refuse(conn, ref)
            if ref.fatal:
                return ref.code.value
        except Exception as exc:  # a bug: answer it, log it, keep serving everyone else
            log.exception("frame handling failed")
            self._refuse(conn, Refusal(ErrorCode.internal, f"internal error: {type(exc).__name__}"))
        return None

    def _refuse(self, conn: Connection, ref: Refusal) -> None:
        self.metrics.errors.labels(ref.code.value).inc()
        log_event(
            log, "error_frame", logging.INFO, code=ref.code.value, session=ref.session_id, message=ref.message
        )
        conn.send(Error(code=ref.code, message=ref.message, session_id=ref.session_id, round=ref.round))

    def _on_hello(self, conn: Connection, msg: Hello) -> None:
        if msg.protocol_version != PROTOCOL_VERSION:
            raise Refusal(
                ErrorCode.bad_request,
                f"protocol version {msg.protocol_version} not supported (server speaks {PROTOCOL_VERSION})",
                fatal=True,
            )
        token = conn.header_token or msg.auth_token
        if self.cfg.auth_tokens and token not in self.cfg.auth_tokens:
            what = "no auth token given" if not token else "auth token not accepted"
            raise Refusal(ErrorCode.unauthorized, what, fatal=True)
        if msg.tokenizer_fingerprint != self.backend.tokenizer_fingerprint:
            raise Refusal(
                ErrorCode.tokenizer_mismatch,
                f"draft tokenizer {msg.tokenizer_fingerprint[:23]}... differs from the target's "
                f"{self.backend.tokenizer_fingerprint[:23]}...: draft and target must share one vocabulary",
                fatal=True,
            )
        conn.owner = owner_key(token if self.cfg.auth_tokens else None)
        conn.send(Welcome(policy=self.policy.name, limits=self.limits))
        log_event(log, "hello", client=msg.client, owner=conn.owner)

    def _owned(self, conn: Connection, session_id: str, round: int | None = None) -> Session:
        session = self.store.get(session_id)
        if session is None:
            raise Refusal(
                ErrorCode.unknown_session,
                "no such session (expired, closed or server restarted): open it again with committed_ids",
                session_id=session_id,
                round=round,
            )
        if session.owner != conn.owner:
            raise Refusal(
                ErrorCode.unauthorized, "session belongs to another token", session_id=session_id, round=round
            )
        return session

    def _check_ids(self, ids: list[int], what: str, session_id=None, round=None) -> None:
        vocab = self.backend.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            raise Refusal(
                ErrorCode.bad_request,
                f"{what} has token ids outside [0, {vocab})",
                session_id=session_id,
                round=round,
            )

    def _on_open(self, conn: Connection, msg: Open) -> None:
        total = len(msg.prompt_ids) + len(msg.committed_ids)
        if total >= self.max_context_len:
            raise Refusal(
                ErrorCode.too_large,
                f"context of {total} tokens (limit {self.max_context_len - 1} to leave room)",
            )
        self._check_ids(msg.prompt_ids, "prompt_ids")
        self._check_ids(msg.committed_ids, "committed_ids")
        if len(msg.committed_ids) >= msg.max_new_tokens:
            raise Refusal(ErrorCode.bad_request, "committed_ids already reach max_new_tokens")
        now = time.monotonic()
        reason = None
        if not self.policy.admit(len(self.store), len(self._waiting)):
            reason = "server is at capacity for its latency targets"
        elif (admit_open := getattr(self.policy, "admit_open", None)) is not None:
            reason = admit_open(msg, list(self.store), now)
        if reason is not None:
            self.slo.refuse()
            raise Refusal(ErrorCode.overloaded, f"{reason}; retry later")
        try:
            session = self.store.create(
                owner=conn.owner or "anon",
                prompt_ids=msg.prompt_ids,
                committed_ids=msg.committed_ids,
                max_new_tokens=msg.max_new_tokens,
                sampling=msg.sampling,
                slo=msg.slo,
                mode=msg.mode,
                stop_ids=msg.stop_token_ids,
            )
        except SessionLimitError as exc:
            raise Refusal(ErrorCode.overloaded, str(exc)) from exc
        session.conn = conn
        session.deadlines = SessionDeadlines.from_slo(
            msg.slo, now, max_new_tokens=msg.max_new_tokens - len(msg.committed_ids)
        )
        self.slo.open(session.id, msg.slo.ttft_ms, msg.slo.tpot_ms, now)
        self.metrics.sessions_opened.labels(msg.mode).inc()
        self.metrics.sessions.set(len(self.store))
        log_event(
            log,
            "session_open",
            session=session.id[:8],
            owner=session.owner,
            context=total,
            mode=msg.mode,
            greedy=msg.sampling.greedy,
            rebuild=bool(msg.committed_ids),
        )
        self._enqueue(Job(session, JobKind.open))

    def _on_resume(self, conn: Connection, msg: Resume) -> None:
        session = self._owned(conn, msg.session_id)
        in_flight = session.pending is not None and session.pending.kind == JobKind.round
        # A round in flight is answered to whoever re-sends it (the client re-sends any round newer than
        # last_round), so a resumed client never gets an unasked-for verdict on top of its re-send's answer.
        session.conn = conn if not in_flight or session.conn is conn else None
        session.touch()
        conn.send(
            Resumed(session_id=session.id, committed_len=session.committed_len, last_round=session.last_round)
        )
        if session.mode == "centralized" and session.opened:
            # Streamed tokens sent to the dead connection are lost; resend them all (committed_len lets the
            # client keep only what it lacks).
            conn.send(
                Tokens(
                    session_id=session.id,
                    tokens=session.tokens[session.prompt_len :],
                    committed_len=session.committed_len,
                    done=session.done,
                )
            )
        log_event(log, "session_resume", session=session.id[:8], committed_len=session.committed_len)

    def _on_close(self, conn: Connection, msg: Close) -> None:
        session = self._owned(conn, msg.session_id)
        self._drop(session)
        conn.send(Closed(session_id=session.id))
        log_event(log, "session_close", session=session.id[:8], generated=session.generated)

    def _drop(self, session: Session) -> None:
        if session.pending is not None and session.pending in self._waiting:
            self._waiting.remove(session.pending)
        session.pending = None
        self.store.remove(session.id, release=False)
        self._session_ended(session)
        self._to_release.append(session.id)
        self._wake.set()
        self.metrics.sessions.set(len(self.store))

    def _on_round(self, conn: Connection, msg: Round) -> None:
        sid, rnd = msg.session_id, msg.round
        session = self._owned(conn, sid, rnd)
        if conn.ws.state is State.OPEN:  # a closed connection's late frame must not steal the session back
            session.conn = conn
        session.touch()

        def bad(code: ErrorCode, text: str) -> Refusal:
            return Refusal(code, text, session_id=sid, round=rnd)

        if rnd == session.last_round and session.last_verdict is not None:
            conn.send(session.last_verdict)  # idempotent re-send: the same verdict, nothing applied again
            return
        pending = session.pending
        if pending is not None and pending.kind == JobKind.round and pending.round == rnd:
            return  # already being verified: its verdict goes to this connection when ready
        if session.mode != "speculative":
            raise bad(ErrorCode.bad_request, "a centralized session takes no rounds")
        if not session.opened or pending is not None:
            raise bad(ErrorCode.bad_request, "wait for the previous answer before sending a round")
        if session.done:
            raise bad(ErrorCode.bad_request, "session is finished (EOS, stop token or max_new_tokens)")
        if rnd != session.last_round + 1:
            raise bad(ErrorCode.bad_request, f"round {rnd} out of order (last answered {session.last_round})")
        if msg.committed_len != session.committed_len:
            raise bad(
                ErrorCode.bad_request,
                f"stale committed_len {msg.committed_len} (server has {session.committed_len})",
            )
        if len(msg.draft_ids) > self.cfg.max_draft_len:
            raise bad(
                ErrorCode.too_large, f"draft of {len(msg.draft_ids)} tokens (limit {self.cfg.max_draft_len})"
            )
        if session.committed_len + len(msg.draft_ids) > self.max_context_len:
            raise bad(ErrorCode.too_large, f"context + draft exceeds max_context_len {self.max_context_len}")
        self._check_ids(msg.draft_ids, "draft_ids", sid, rnd)
        q = None
        if not session.sampling.greedy and msg.draft_ids:
            if msg.q_ids is None or msg.q_probs is None:
                raise bad(ErrorCode.bad_request, "a sampling session's round needs the draft distribution q")
            try:
                q = [
                    dense_q(ids, probs, self.backend.vocab_size, tok)
                    for ids, probs, tok in zip(msg.q_ids, msg.q_probs, msg.draft_ids, strict=True)
                ]
            except DraftError as exc:
                raise bad(ErrorCode.bad_request, str(exc)) from exc
        self._enqueue(Job(session, JobKind.round, round=rnd, draft=list(msg.draft_ids), q=q))

    def _enqueue(self, job: Job) -> None:
        d = job.session.deadlines
        if d is not None:  # when the answer must reach the device (docs/scheduling.md, "Deadlines")
            if job.kind == JobKind.open:
                job.deadline = d.prefill_deadline()
            else:
                job.deadline = d.round_deadline(len(job.draft), job.enqueued_at)
        job.session.pending = job
        self._waiting.append(job)
        self.metrics.queued.set(len(self._waiting))
        self._wake.set()

    # ---- the batching loop ----

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = time.monotonic()
            jobs: list[Job] = []
            while self._to_release:
                self.backend.release(self._to_release.pop())
            if now - self._last_housekeeping > _HOUSEKEEPING_S:
                self._housekeeping(now)
            if not self._waiting:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=_HOUSEKEEPING_S)
                continue
            t_iter = time.perf_counter()
            try:
                for job in self._waiting:
                    job.cached_len = self.backend.cached_len(job.session.id)
                jobs = self.policy.select(list(self._waiting), self.cfg.max_batch, now)
                plan = self._fit_budget([self._plan(job) for job in jobs])
                jobs = [p.job for p in plan]
                if not plan:
                    # The policy chose to wait (e.g. SLED filling a batch): until its wakeup or an arrival.
                    wakeup = getattr(self.policy, "wakeup", None)
                    at = wakeup(now) if wakeup is not None else now + 0.005  # no wakeup hook: poll
                    timeout = (
                        _HOUSEKEEPING_S if at is None else min(max(at - now, _MIN_SLEEP_S), _HOUSEKEEPING_S)
                    )
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=timeout)
                    continue
                self._make_room(plan)
                for p in plan:
                    if p.job.started_at is None:
                        p.job.started_at = now
                        self.metrics.queue_wait.observe(now - p.job.enqueued_at)
                shapes = [self._shape(p) for p in plan]
                outcomes, stats = await loop.run_in_executor(self._executor, self._run_isolated, plan)
                self.policy.observe(stats, jobs)
                self.metrics.observe_batch(stats.batch_size, stats.forward_s)
                for outcome in outcomes:
                    self._apply(outcome, stats)
                step_s = time.perf_counter() - t_iter
                if stats.forward_s > 0:
                    # The estimator learns how long the batch held the server (selection, forward, answers
                    # sent): the next batch and every deadline wait on that, not on the forward alone.
                    self.estimator.observe(step_s, shapes)
                self._log_steps(stats, step_s)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the loop die: fail what was selected, keep serving
                log.exception("batch loop iteration failed")
                for job in jobs:
                    if job.session.pending is job:
                        self._fail(job, "batch failed")
            self.metrics.queued.set(len(self._waiting))
            await asyncio.sleep(0)  # let connection handlers enqueue before the next selection

    def _log_steps(self, stats: BatchStats, step_s: float, every_s: float = 10.0) -> None:
        """Every `every_s`: one `steps` line (batch sizes, forward and whole-step times, the graph cache)."""
        self._steps.append((stats.batch_size, stats.new_tokens, stats.forward_s, step_s))
        now = time.monotonic()
        if now - self._steps_logged < every_s:
            return
        elapsed = now - self._steps_logged
        steps, self._steps, self._steps_logged = self._steps, [], now

        def pct(xs: list[float], q: float) -> float:
            xs = sorted(xs)
            return 1000.0 * xs[min(len(xs) - 1, int(q * len(xs)))]

        fwd = [x[2] for x in steps]
        whole = [x[3] for x in steps]
        graphs = getattr(self.backend, "graph_stats", None)
        log_event(
            log,
            "steps",
            n=len(steps),
            batch_mean=round(sum(x[0] for x in steps) / len(steps), 1),
            tokens_mean=round(sum(x[1] for x in steps) / len(steps), 1),
            forward_ms_p50=pct(fwd, 0.5),
            forward_ms_p90=pct(fwd, 0.9),
            step_ms_p50=pct(whole, 0.5),
            step_ms_p90=pct(whole, 0.9),
            busy=round(sum(whole) / elapsed, 2),  # fraction of the time the batch loop was working
            **({"graphs": dict(graphs)} if graphs else {}),
        )

    def _plan(self, job: Job) -> _Planned:
        session = job.session
        sid = session.id
        cached = self.backend.cached_len(sid)
        ctx_pending = session.committed_len - cached
        if ctx_pending < 1:
            # The KV may hold at most every committed token but the last; anything more is stale.
            self.backend.truncate(sid, session.committed_len - 1)
            cached = self.backend.cached_len(sid)
            ctx_pending = session.committed_len - cached
        new = session.tokens[cached:]
        chunk = job.max_tokens or self.cfg.prefill_chunk
        if ctx_pending + len(job.draft) > chunk and ctx_pending > 1:
            # Chunked prefill: push context only, keep at least the last context token for the final item.
            n = min(chunk, ctx_pending - 1)
            item = WorkItem(
                sid,
                new[:n],
                n_logits=0,
                sampling=session.sampling,
                context=session.tokens,
                deadline=job.deadline,
            )
            return _Planned(job, item, final=False, cached_before=cached)
        item = WorkItem(
            sid,
            new + job.draft,
            n_logits=len(job.draft) + 1,
            sampling=session.sampling,
            context=session.tokens,
            deadline=job.deadline,
        )
        return _Planned(job, item, final=True, cached_before=cached)

    @staticmethod
    def _shape(p: _Planned) -> ItemShape:
        """The estimator's view of a planned item (also left on the job as annotations["ran_shape"])."""
        job = p.job
        # A round whose KV was lost (evicted) rebuilds its whole context first: a cache miss.
        miss = job.kind != JobKind.open and p.cached_before == 0 and job.batches == 0 and job.cache_miss
        shape = ItemShape(len(p.item.new_tokens), p.cached_before, miss)
        job.annotations["ran_shape"] = shape
        job.annotations["final"] = p.final
        return shape

    def _fit_budget(self, plan: list[_Planned]) -> list[_Planned]:
        """The longest prefix of the plan whose sessions' KV fits the budget together (at least one job)."""
        total = 0
        for i, p in enumerate(plan):
            total += p.cached_before + len(p.item.new_tokens)
            if i and total > self.cfg.kv_budget_tokens:
                return plan[:i]
        return plan

    def _make_room(self, plan: list[_Planned]) -> None:
        needed = sum(len(p.item.new_tokens) for p in plan)
        for session in self.store.make_room(needed, protect={p.job.session.id for p in plan}):
            self.metrics.sessions_evicted.inc()
            log_event(log, "session_evict", session=session.id[:8], committed_len=session.committed_len)

    def _run_isolated(self, plan: list[_Planned]) -> tuple[list[_Outcome], BatchStats]:
        """Run the batch; if the forward itself fails, roll back and run each item alone to find the culprit."""
        try:
            return self._run(plan)
        except Exception as exc:
            if len(plan) == 1:
                for p in plan:
                    self.backend.truncate(p.job.session.id, p.cached_before)
                log.exception("forward failed for session %s", plan[0].job.session.id[:8])
                return [_Outcome(plan[0], error=f"{type(exc).__name__}")], _empty_stats(plan)
            log.exception("batched forward failed; retrying its %d items one by one", len(plan))
        outcomes: list[_Outcome] = []
        total = _empty_stats(plan)
        for p in plan:
            self.backend.truncate(p.job.session.id, p.cached_before)
        for p in plan:
            out, stats = self._run_isolated([p])
            outcomes += out
            total.forward_s += stats.forward_s
        return outcomes, total

    def _run(self, plan: list[_Planned]) -> tuple[list[_Outcome], BatchStats]:
        """Worker thread: the forward pass and acceptance (per job: one job's failure is its own)."""
        results, stats = self.backend.forward([p.item for p in plan])
        outcomes = []
        for p, res in zip(plan, results, strict=True):
            out = _Outcome(p, res)
            if p.final:
                try:
                    out.accepted, out.next_token = self._decide(p.job, res)
                except Exception as exc:
                    log.exception("acceptance failed for session %s", p.job.session.id[:8])
                    out.error = type(exc).__name__
            outcomes.append(out)
        return outcomes, stats

    def _decide(self, job: Job, res: ItemResult) -> tuple[int, int]:
        session = job.session
        if self.cfg.fault_token is not None and self.cfg.fault_token in job.draft:
            raise InjectedFault("debug fault token in draft")
        if job.kind != JobKind.round or not job.draft:
            if session.sampling.greedy:
                return 0, res.argmax[0]
            return 0, sample_token(torch.as_tensor(res.probs)[0], session.gen)
        if session.sampling.greedy:
            d = accept_greedy(job.draft, res.argmax)
        else:
            d = accept_sampling(job.draft, job.q or [], torch.as_tensor(res.probs), session.gen)
        return d.accepted, d.next_token

    def _fail(self, job: Job, message: str) -> None:
        session = job.session
        if job in self._waiting:
            self._waiting.remove(job)
        if session.pending is job:
            session.pending = None
        self.backend.truncate(session.id, session.committed_len - 1)
        if session.conn is not None:
            rnd = job.round if job.kind == JobKind.round else None
            self._refuse(
                session.conn,
                Refusal(
                    ErrorCode.internal,
                    f"verification failed ({message}); resend",
                    session_id=session.id,
                    round=rnd,
                ),
            )

    def _apply(self, out: _Outcome, stats: BatchStats) -> None:
        job = out.planned.job
        session = job.session
        job.forward_s += stats.forward_s
        job.batches += 1
        if self.store.get(session.id) is not session:
            self.backend.release(session.id)  # closed while in the batch: the forward stored KV again
            return
        sent_at = time.monotonic()
        if session.pending is not job:
            return
        if out.error is not None:
            self._fail(job, out.error)
            return
        if not out.planned.final:
            return  # more prefill chunks to go; the job stays waiting
        self._waiting.remove(job)
        session.pending = None
        session.touch()
        proposed = job.draft[: out.accepted] + [out.next_token]
        before = session.committed_len
        take, done = self._cut(session, proposed)
        session.tokens += proposed[:take]
        accepted, next_token = take - 1, proposed[take - 1]
        if done:
            session.done = True
            self.backend.release(session.id)  # no more rounds: free the KV now (re-sent rounds use the cache)
        else:
            self.backend.truncate(session.id, session.committed_len - 1)
        queue_ms = 1000.0 * ((job.started_at or job.enqueued_at) - job.enqueued_at)
        hint = self.policy.wait_hint_ms(session, len(self._waiting))
        self.metrics.committed_tokens.inc(take)
        conn = session.conn
        if job.kind == JobKind.round:
            verdict = Verdict(
                session_id=session.id,
                round=job.round,
                committed_len=session.committed_len,
                accepted=accepted,
                next_token=next_token,
                done=done,
                queue_ms=queue_ms,
                verify_ms=1000.0 * job.forward_s,
                wait_hint_ms=hint,
            )
            session.last_round = job.round
            session.last_verdict = verdict
            self.metrics.rounds.inc()
            self.metrics.draft_tokens.inc(len(job.draft))
            self.metrics.accepted_tokens.inc(accepted)
            log_event(
                log,
                "round",
                logging.DEBUG,
                session=session.id[:8],
                round=job.round,
                drafted=len(job.draft),
                accepted=accepted,
                committed_len=session.committed_len,
            )
            if conn is not None:
                conn.send(verdict)
            self._answered(job, take, accepted, sent_at, done)
            return
        if job.kind == JobKind.open:
            session.opened = True
            if conn is not None:
                conn.send(
                    Opened(
                        session_id=session.id,
                        committed_len=session.committed_len,
                        next_token=next_token,
                        done=done,
                        prefill_ms=1000.0 * job.forward_s,
                        queue_ms=queue_ms,
                        wait_hint_ms=hint,
                    )
                )
        elif conn is not None:  # centralized decode step
            conn.send(
                Tokens(
                    session_id=session.id, tokens=[next_token], committed_len=session.committed_len, done=done
                )
            )
        self._answered(job, take, accepted, sent_at, done)
        if session.mode == "centralized" and not done:
            self._enqueue(Job(session, JobKind.decode))  # continuous batching: straight back in the queue
        elif before and done:
            log_event(log, "session_done", session=session.id[:8], generated=session.generated)

    def _answered(self, job: Job, take: int, accepted: int, sent_at: float, done: bool) -> None:
        """An Opened / Verdict / Tokens frame went out: deadlines, SLO metrics, and the policy's hook."""
        session = job.session
        drafted = len(job.draft) if job.kind == JobKind.round else 0
        d = session.deadlines
        if d is not None:
            if job.kind == JobKind.open:
                d.on_first_token(sent_at)
            else:
                d.on_round(drafted, accepted, sent_at)
        self.slo.tokens(session.id, take, sent_at)
        if job.kind != JobKind.open:
            req = job.annotations.get("req")
            if req is not None:
                solo_shape = ItemShape(req.new_tokens, req.context_len, req.cache_miss)
            else:
                solo_shape = ItemShape(max(1, len(job.draft) + 1), session.committed_len - take)
            solo = self.estimator.predict([solo_shape])
            met = job.deadline is None or sent_at <= job.deadline + 1e-9
            self.slo.round(session.id, sent_at - job.enqueued_at, solo, met)
        hook = getattr(self.policy, "answered", None)
        if hook is not None:
            hook(job, drafted, accepted, sent_at)
        if done:
            self._session_ended(session, sent_at)

    def _session_ended(self, session: Session, now: float | None = None) -> None:
        """Judge the session's SLO once (done, closed or expired) and let the policy forget it."""
        if self.slo.close(session.id, time.monotonic() if now is None else now) is None:
            return
        hook = getattr(self.policy, "closed", None)
        if hook is not None:
            hook(session)

    def _cut(self, session: Session, proposed: list[int]) -> tuple[int, bool]:
        """How many of the proposed tokens to commit, and whether the session ends with them.

        A sequence ends at EOS or a stop token (inclusive), at max_new_tokens, or at max_context_len. Cutting an
        accepted run short is still exact: a prefix of a target sample is a target sample of that prefix.
        """
        room = min(session.max_new_tokens - session.generated, self.max_context_len - session.committed_len)
        take = max(1, min(len(proposed), room))
        for i, tok in enumerate(proposed[:take]):
            if tok in self._eos or tok in session.stop_ids:
                return i + 1, True
        done = take >= room
        return take, done

    def _housekeeping(self, now: float) -> None:
        self._last_housekeeping = now
        for session in self.store.expire(now):
            self._session_ended(session, now)
            self.metrics.sessions_expired.inc()
            log_event(log, "session_expire", session=session.id[:8], committed_len=session.committed_len)
        kv_tokens = self.store.kv_tokens()
        self.metrics.sessions.set(len(self.store))
        self.metrics.kv_tokens.set(kv_tokens)
        self.metrics.kv_bytes.set(self.backend.kv_bytes())
        self._slo_summary(now)


def _empty_stats(plan: list[_Planned]) -> BatchStats:
    return BatchStats(
        batch_size=len(plan), new_tokens=0, context_tokens=0, max_context=0, cache_misses=0, forward_s=0.0
    )
