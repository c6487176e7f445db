"""The websocket gateway: frames in, sessions and jobs to the engine, the engine's replies out as frames.

It owns connections, frame limits, Hello (protocol version, auth token, tokenizer), session ownership and typed
errors. It never touches the model: every session operation goes to the `Engine`, which answers with replies or a
`Refusal`. One writer task per connection sends in order and never blocks the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State
from websockets.typing import Subprotocol
from wisp_sdk.errors import ProtocolError, WispError
from wisp_sdk.openai_http import OpenAIHttp
from wisp_sdk.protocol import (
    PROTOCOL_VERSION,
    SUBPROTOCOL,
    Close,
    Closed,
    Error,
    ErrorCode,
    Hello,
    Open,
    Resume,
    Round,
    Welcome,
    decode_client,
    encode,
)

from wisp_cloud.api import ServeHttp
from wisp_cloud.config import ServerConfig, is_loopback
from wisp_cloud.engine import Engine
from wisp_cloud.http_front import Sniffer
from wisp_cloud.logs import log_event
from wisp_cloud.replies import Peer, Refusal, Reply
from wisp_cloud.sessions import Session, owner_key

log = logging.getLogger("wisp.server")
_SUBPROTOCOL = Subprotocol(SUBPROTOCOL)


# Client errors are logged as one INFO line each, at most this many a second (then one line saying how many more).
_ERROR_LINES_PER_S = 20
# Before Hello, only a text frame this small is decoded (a Hello is ~200 bytes).
_PRE_HELLO_BYTES = 4096
_TOO_MANY_BAD = "too many bad frames"


@dataclass(eq=False)
class Connection:
    ws: ServerConnection
    header_token: str | None
    peer: str = ""
    outbox_frames: int = 1024
    owner: str | None = None  # set by a successful Hello
    outbox: asyncio.Queue = field(init=False)
    # set while the outbox is at most half full: the reader waits on it (backpressure)
    writable: asyncio.Event = field(default_factory=asyncio.Event)
    bytes_in: int = 0
    bytes_out: int = 0
    bad_frames: int = 0
    overflowed: bool = False

    def __post_init__(self) -> None:
        self.outbox = asyncio.Queue(maxsize=self.outbox_frames + 1)  # + 1: the writer's stop marker
        self.writable.set()

    def send(self, data: str | bytes) -> None:
        """Queue a frame; the connection's writer task keeps order and never blocks the engine. A client that
        lets `outbox_frames` answers pile up is closed (it can resume on a new connection)."""
        if self.overflowed:
            return
        if self.outbox.qsize() >= self.outbox_frames:
            self.overflowed = True
            self.writable.set()  # let the reader run into the closed connection and end
            self.ws.transport.abort()  # it does not read: a closing handshake would wait on it too
            return
        self.outbox.put_nowait(data)
        if self.outbox.qsize() > self.outbox_frames // 2:
            self.writable.clear()


class ErrorLog:
    """One line per client error, at most `per_s` a second; the rest are counted and reported in one line."""

    def __init__(self, per_s: int = _ERROR_LINES_PER_S) -> None:
        self.per_s = per_s
        self._window = 0
        self._lines = 0
        self._suppressed = 0

    def allow(self) -> bool:
        now = int(time.monotonic())
        if now != self._window:
            if self._suppressed:
                log_event(log, "error_frames_suppressed", n=self._suppressed)
            self._window, self._lines, self._suppressed = now, 0, 0
        if self._lines < self.per_s:
            self._lines += 1
            return True
        self._suppressed += 1
        return False


class Gateway:
    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.cfg = config
        self._server: Server | None = None
        self.port: int | None = None
        self._errors = ErrorLog()
        self.draining = False
        self.engine_alive: Callable[[], bool] = lambda: True  # set by WispServer
        self._per_ip: dict[str, int] = {}
        self._open = 0
        self._closing: set[asyncio.Task] = set()
        engine.deliver = self.deliver
        # Plain HTTP on the same port; WispServer gives it the OpenAI routes when it knows the target's tokenizer.
        self.http: OpenAIHttp = ServeHttp(
            None, config.auth_tokens, config.max_frame_bytes, self.ready, self.metrics_text
        )

    def rebind(self, engine: Engine) -> None:
        """Hand new work to `engine` (WispServer.switch_policy; no session of the old one is left)."""
        self.engine = engine
        engine.deliver = self.deliver

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on `sock` when given (bound early by `wisp serve`), else on the config's host and port."""
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
                None if sock else cfg.host,
                None if sock else cfg.port,
                sock=sock,
                ssl=ssl_ctx,
                # Hard cap well above our own limit, so a merely too-large frame still gets a too_large Error.
                max_size=4 * cfg.max_frame_bytes,
                compression=None,  # frames are already compact binary; deflate only adds latency
                select_subprotocol=lambda _conn, offered: _SUBPROTOCOL if _SUBPROTOCOL in offered else None,
                create_connection=self._front,  # type: ignore[arg-type]
                server_header="wisp-cloud",
            )
        except OSError as exc:
            raise WispError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from exc
        self.port = self._server.sockets[0].getsockname()[1]

    def _front(self, protocol: Any, server: Any, **kwargs: Any) -> Sniffer:
        """websockets' connection factory: a `Sniffer` that becomes its `ServerConnection` on a websocket upgrade
        and the HTTP routes (health, metrics, OpenAI) otherwise (http_front.py)."""
        return Sniffer(
            protocol,
            lambda: ServerConnection(protocol, server, **kwargs),
            self._http,
            self.cfg.hello_timeout_s,
        )

    def metrics_text(self) -> tuple[str, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.engine.metrics.registry).decode(), CONTENT_TYPE_LATEST

    def start_draining(self) -> None:
        self.draining = True
        if self._server is not None:
            self._server.server.close()  # no new connections; the open ones go on (their rounds finish)

    def ready(self) -> bool:
        """Takes new sessions: listening, the engine loop alive, not draining."""
        return self._server is not None and not self.draining and self.engine_alive()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self.http.close_connections()
            await self._server.wait_closed()
            self._server = None

    # ---- replies from the engine ----

    def deliver(self, replies: list[Reply]) -> None:
        for r in replies:
            conn = r.conn
            msg = r.message
            if isinstance(msg, bytes | str):
                conn.send(msg)
            elif isinstance(msg, Refusal):
                self._refuse(conn, msg)
            else:
                conn.send(encode(msg))

    def _refuse(self, conn: Peer, ref: Refusal) -> None:
        self.engine.metrics.errors.labels(ref.code.value).inc()
        if self._errors.allow():
            log_event(
                log,
                "error_frame",
                logging.INFO,
                code=ref.code.value,
                session=ref.session_id,
                message=ref.message,
            )
        conn.send(
            encode(Error(code=ref.code, message=ref.message, session_id=ref.session_id, round=ref.round))
        )

    # ---- connections ----

    def _take_slot(self, peer: str) -> bool:
        """A connection slot under --max-connections and --max-connections-per-ip (websocket and HTTP alike)."""
        cfg = self.cfg
        if self._open >= cfg.max_connections or self._per_ip.get(peer, 0) >= cfg.max_connections_per_ip:
            if self._errors.allow():
                log_event(log, "connection_refused", peer=peer, open=self._open)
            return False
        self._open += 1
        self._per_ip[peer] = self._per_ip.get(peer, 0) + 1
        return True

    def _free_slot(self, peer: str) -> None:
        self._open -= 1
        left = self._per_ip.pop(peer, 1) - 1
        if left:
            self._per_ip[peer] = left

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A plain-HTTP connection (health checks, metrics, the OpenAI routes) holds a slot as a websocket does."""
        address = writer.get_extra_info("peername")
        peer = str(address[0]) if address else ""
        if not self._take_slot(peer):
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 38\r\n"
                b"connection: close\r\nretry-after: 1\r\n\r\ntoo many connections; try again later\n"
            )
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.close()
            return
        try:
            await self.http.handle(reader, writer)
        finally:
            self._free_slot(peer)

    async def _handle(self, ws: ServerConnection) -> None:
        cfg = self.cfg
        auth = ws.request.headers.get("Authorization") if ws.request else None
        header_token = auth[7:].strip() if auth and auth[:7].lower() == "bearer " else None
        peer = str(ws.remote_address[0]) if ws.remote_address else ""
        forwarded = ws.request.headers.get("X-Forwarded-For") if ws.request else None
        if forwarded and peer in cfg.trusted_proxies:
            peer = forwarded.rsplit(",", 1)[-1].strip() or peer
        if not self._take_slot(peer):
            with contextlib.suppress(ConnectionClosed):
                await ws.close(1013, "too many connections; try again later")  # 1013: try again later
            return
        conn = Connection(ws, header_token, peer, cfg.outbox_frames)
        writer = asyncio.create_task(self._writer(conn))
        # A connection that never says Hello holds a file descriptor and nothing else: closed at the deadline.
        hello_timer = asyncio.get_running_loop().call_later(cfg.hello_timeout_s, self._hello_expired, conn)
        close_reason: str | None = None
        try:
            async for frame in ws:
                conn.bytes_in += len(frame)
                close_reason = self._on_frame(conn, frame)
                if close_reason:
                    break
                # backpressure: read no more while the client does not read its answers
                while not conn.writable.is_set() and ws.state is State.OPEN:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(conn.writable.wait(), 1.0)
        except ConnectionClosed:
            pass
        finally:
            hello_timer.cancel()
            self._free_slot(peer)
            self.engine.detach(conn)
            with contextlib.suppress(asyncio.QueueFull):
                conn.outbox.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed, TimeoutError):
                await asyncio.wait_for(
                    writer, timeout=5
                )  # flush what was queued (e.g. the fatal Error frame)
            writer.cancel()
            if close_reason == _TOO_MANY_BAD:
                ws.transport.abort()  # a flood gets no closing handshake to wait on
            elif close_reason:
                with contextlib.suppress(ConnectionClosed):
                    await ws.close(1008, close_reason)  # 1008: policy violation

    def _hello_expired(self, conn: Connection) -> None:
        if conn.owner is None:
            task = asyncio.get_running_loop().create_task(conn.ws.close(1008, "no hello within the deadline"))
            self._closing.add(task)  # keep a reference until it is done (the loop holds only a weak one)
            task.add_done_callback(self._closing.discard)

    async def _writer(self, conn: Connection) -> None:
        try:
            while True:
                data = await conn.outbox.get()
                if data is None:
                    return
                try:
                    await conn.ws.send(data)
                    conn.bytes_out += len(data)
                except ConnectionClosed:
                    return
                if conn.outbox.qsize() <= conn.outbox_frames // 2:
                    conn.writable.set()
        finally:
            conn.writable.set()  # a reader waiting for room must not wait for a writer that is gone

    def _on_frame(self, conn: Connection, frame: str | bytes) -> str | None:
        """Handle one frame; returns a close reason when the connection must be closed."""
        try:
            limit = self.cfg.max_frame_bytes
            size = len(frame)
            if (
                isinstance(frame, str) and size * 4 > limit
            ):  # a character is up to 4 bytes: count them exactly
                size = len(frame.encode("utf-8", "surrogatepass"))
            if size > limit:
                raise Refusal(ErrorCode.too_large, f"frame of {size} bytes (limit {limit})")
            if conn.owner is None and (isinstance(frame, bytes) or size > _PRE_HELLO_BYTES):
                raise Refusal(ErrorCode.bad_request, "send hello first")  # not decoded: no work before Hello
            try:
                msg = decode_client(frame)
            except ProtocolError as exc:
                raise Refusal(ErrorCode.bad_request, str(exc)) from exc
            if isinstance(msg, Hello):
                self._on_hello(conn, msg)
            elif conn.owner is None:
                raise Refusal(ErrorCode.bad_request, "send hello first")
            elif isinstance(msg, Round):
                session = self._owned(conn, msg.session_id, msg.round)
                self.deliver(self.engine.round(session, conn, msg, conn.ws.state is State.OPEN))
            elif isinstance(msg, Open):
                if self.draining:
                    raise Refusal(
                        ErrorCode.overloaded, "server is draining; open the session on another replica"
                    )
                self.engine.open(conn.owner, conn, msg)
            elif isinstance(msg, Resume):
                self.deliver(self.engine.resume(self._owned(conn, msg.session_id), conn))
            elif isinstance(msg, Close):
                session = self._owned(conn, msg.session_id)
                self.engine.close_session(session)
                conn.send(encode(Closed(session_id=session.id)))
        except Refusal as ref:
            self._refuse(conn, ref)
            if ref.fatal:
                return ref.code.value
            if ref.code in (ErrorCode.bad_request, ErrorCode.too_large, ErrorCode.unauthorized):
                conn.bad_frames += 1
                if conn.bad_frames > self.cfg.max_bad_frames:
                    return _TOO_MANY_BAD
        except Exception as exc:  # a bug: answer it, log it (rate-limited), keep serving everyone else
            if self._errors.allow():
                log.exception("frame handling failed")
            self._refuse(conn, Refusal(ErrorCode.internal, f"internal error: {type(exc).__name__}"))
        return None

    def _on_hello(self, conn: Connection, msg: Hello) -> None:
        if msg.protocol_version != PROTOCOL_VERSION:
            raise Refusal(
                ErrorCode.bad_request,
                f"protocol version {msg.protocol_version} not supported (server speaks {PROTOCOL_VERSION}): "
                "upgrade the client SDK",
                fatal=True,
            )
        token = conn.header_token or msg.auth_token
        if self.cfg.auth_tokens and token not in self.cfg.auth_tokens:
            what = "no auth token given" if not token else "auth token not accepted"
            raise Refusal(ErrorCode.unauthorized, what, fatal=True)
        fingerprint = self.engine.backend.tokenizer_fingerprint
        if msg.tokenizer_fingerprint != fingerprint:
            raise Refusal(
                ErrorCode.tokenizer_mismatch,
                f"draft tokenizer {msg.tokenizer_fingerprint[:23]}... differs from the target's "
                f"{fingerprint[:23]}...: draft and target must share one vocabulary",
                fatal=True,
            )
        conn.owner = owner_key(token if self.cfg.auth_tokens else None)
        conn.send(encode(Welcome(policy=self.engine.policy.name, limits=self.engine.limits)))
        log_event(log, "hello", client=msg.client, owner=conn.owner)

    def _owned(self, conn: Connection, session_id: str, round: int | None = None) -> Session:
        session = self.engine.store.get(session_id)
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
