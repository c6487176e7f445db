"""The OpenAI-compatible HTTP routes over h11 (a sans-I/O HTTP/1.1 parser), for `wisp serve` (on the websocket
port, docs/http.md) and `wisp edge serve` (its own port).

    GET  /v1/models                 the one model this side serves
    POST /v1/completions            prompt -> text (SSE with "stream": true)
    POST /v1/chat/completions       messages (the target's chat template) -> assistant message

Every mistake is an OpenAI error body with its HTTP status. A client that disconnects stops its generation: the
connection's reader is watched while the answer is produced, and the generation is closed on EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11

from wisp_sdk.openai_api import (
    ApiError,
    ChatRequest,
    Completer,
    CompletionRequest,
    Outcome,
    Reply,
    chat_ids,
    completion_ids,
    finish_reason,
    params_of,
    parse,
    sse,
)

log = logging.getLogger("wisp.http")

_READ = 65536
_MAX_HEAD = 16384  # request line + headers
_IDLE_S = 75.0  # a keep-alive connection with no request for this long is closed
_DISCARD = 16  # an oversized body is read and dropped up to this many times the limit before the 413


@dataclass
class Plain:
    """A non-OpenAI answer (health checks, metrics, 426 on the websocket port)."""

    status: int
    body: str
    content_type: str = "text/plain; charset=utf-8"


class _Gone(Exception):
    """The client closed the connection."""


class OpenAIHttp:
    """Serves the OpenAI routes of one `Completer`; `tokens` (empty: no auth) are the accepted bearer tokens."""

    def __init__(
        self,
        completer: Completer | None,
        tokens: frozenset[str] = frozenset(),
        max_body: int = 1 << 20,
        unavailable: str = "the OpenAI routes are not available on this server",
    ) -> None:
        self.completer = completer
        self.tokens = tokens
        self.max_body = max_body
        self.unavailable = unavailable
        self._writers: set[asyncio.StreamWriter] = set()

    # ---- what a side adds ----

    def plain_route(self, method: str, path: str) -> Plain | None:
        """A route outside /v1 (the cloud: /health, /ready, /metrics); None: 404."""
        return None

    def check_ready(self) -> None:
        """Raise `ApiError` (503) when no generation can start now."""

    # ---- serving ----

    async def serve(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self.handle, host, port)

    def close_connections(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        self._writers.add(writer)
        try:
            while True:
                try:
                    got = await self._read_request(conn, reader)
                except ApiError as exc:  # an oversized body: answer, then close
                    if conn.our_state is h11.SEND_RESPONSE:
                        await self._send_json(conn, writer, exc.status, exc.body(), close=True)
                    return
                if got is None:
                    return
                request, body = got
                await self._respond(conn, reader, writer, request, body)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with contextlib.suppress(Exception):
                    err = ApiError(exc.error_status_hint, f"bad HTTP request: {exc}")
                    await self._send_json(conn, writer, err.status, err.body(), close=True)
        except (_Gone, ConnectionError, TimeoutError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request, bytes] | None:
        request: h11.Request | None = None
        body = bytearray()
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(reader.read(_READ), _IDLE_S)
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size <= self.max_body:
                    body += event.data
                elif size > _DISCARD * self.max_body:
                    raise ApiError(413, f"request body over {self.max_body} bytes")
                # else: read on and drop it, so the client (still sending) gets to read the 413
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                if size > self.max_body:
                    raise ApiError(413, f"request body over {self.max_body} bytes")
                return request, bytes(body)
            else:  # ConnectionClosed, PAUSED
                return None

    async def _respond(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: h11.Request,
        body: bytes,
    ) -> None:
        method = request.method.decode()
        path = request.target.decode("latin-1").split("?", 1)[0]
        try:
            if not path.startswith("/v1/"):
                plain = self.plain_route(method, path)
                if plain is None:
                    raise ApiError(404, f"no route {method} {path}", code="not_found")
                await self._send(
                    conn,
                    writer,
                    plain.status,
                    plain.body.encode(),
                    [("content-type", plain.content_type)],
                )
                return
            api_key = self._authorize(request.headers)
            completer = self.completer
            if completer is None:
                raise ApiError(503, self.unavailable, type="server_error")
            if path.rstrip("/") == "/v1/models":
                _only(method, "GET")
                await self._send_json(conn, writer, 200, {"object": "list", "data": [_model(completer)]})
            elif path.startswith("/v1/models/"):
                _only(method, "GET")
                if path[len("/v1/models/") :] != completer.model:
                    raise ApiError(
                        404, f"model {path[len('/v1/models/') :]!r} does not exist", code="model_not_found"
                    )
                await self._send_json(conn, writer, 200, _model(completer))
            elif path in ("/v1/completions", "/v1/chat/completions"):
                _only(method, "POST")
                await self._generate(
                    conn, reader, writer, completer, path == "/v1/chat/completions", body, api_key
                )
            else:
                raise ApiError(404, f"no route {method} {path}", code="not_found")
        except ApiError as exc:
            if conn.our_state is h11.SEND_RESPONSE:
                await self._send_json(conn, writer, exc.status, exc.body())

    def _authorize(self, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        if not self.tokens:
            return None
        auth = next((v.decode("latin-1") for k, v in headers if k == b"authorization"), "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if token not in self.tokens:
            what = "no API key given (Authorization: Bearer TOKEN)" if not token else "API key not accepted"
            raise ApiError(401, what, type="authentication_error", code="invalid_api_key")
        return token

    async def _generate(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        completer: Completer,
        chat: bool,
        body: bytes,
        api_key: str | None,
    ) -> None:
        if chat:
            req: ChatRequest | CompletionRequest = parse(ChatRequest, body)
        else:
            req = parse(CompletionRequest, body)
        if req.model != completer.model:
            raise ApiError(
                404,
                f"model {req.model!r} does not exist (this server serves {completer.model!r})",
                param="model",
                code="model_not_found",
            )
        self.check_ready()
        if isinstance(req, ChatRequest):
            ids, limit = chat_ids(completer, req), req.limit
        else:
            ids, limit = completion_ids(completer, req), req.max_tokens
        params = params_of(completer, req, len(ids), limit, api_key)
        reply = Reply(chat, completer.model)
        work = self._stream(conn, writer, completer, req, ids, params, reply) if req.stream else None
        task = asyncio.ensure_future(work or self._whole(conn, writer, completer, ids, params, reply))
        watch = asyncio.ensure_future(_watch_eof(conn, reader))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():  # the client left (or we were cancelled): stop the generation
                task.cancel()
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, _Gone, ConnectionError):
                await task
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        if task.cancelled():
            raise _Gone()
        exc = task.exception()
        if exc is not None:
            raise exc

    async def _whole(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        completer: Completer,
        ids: list[int],
        params: Any,
        reply: Reply,
    ) -> None:
        out = Outcome()
        parts: list[str] = []
        async with contextlib.aclosing(completer.stream(ids, params, out)) as gen:  # type: ignore[type-var]
            async for delta in gen:
                parts.append(delta)
        body = reply.full("".join(parts), finish_reason(out.finish_reason), len(ids), out.completion_tokens)
        await self._send_json(conn, writer, 200, body)

    async def _stream(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        completer: Completer,
        req: ChatRequest | CompletionRequest,
        ids: list[int],
        params: Any,
        reply: Reply,
    ) -> None:
        out = Outcome()
        started = False

        async def start() -> None:
            nonlocal started
            started = True
            headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
            await _write(writer, conn.send(h11.Response(status_code=200, headers=headers, reason=b"OK")))
            if reply.chat:
                await self._event(conn, writer, reply.chunk("", first=True))

        async with contextlib.aclosing(completer.stream(ids, params, out)) as gen:  # type: ignore[type-var]
            try:
                async for delta in gen:
                    if not started:
                        await start()  # after the first token: an early refusal still gets its HTTP status
                    if delta:
                        await self._event(conn, writer, reply.chunk(delta))
            except ApiError as exc:
                if not started:
                    raise
                await self._event(conn, writer, exc.body())
                await _write(writer, conn.send(h11.Data(data=sse("[DONE]"))) + conn.send(h11.EndOfMessage()))
                return
        if not started:
            await start()
        await self._event(conn, writer, reply.chunk(None, finish_reason(out.finish_reason)))
        if req.include_usage:
            await self._event(conn, writer, reply.usage_chunk(len(ids), out.completion_tokens))
        await _write(writer, conn.send(h11.Data(data=sse("[DONE]"))) + conn.send(h11.EndOfMessage()))

    async def _event(self, conn: h11.Connection, writer: asyncio.StreamWriter, data: dict[str, Any]) -> None:
        await _write(writer, conn.send(h11.Data(data=sse(data))))

    async def _send_json(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        body: dict[str, Any],
        close: bool = False,
    ) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        await self._send(conn, writer, status, data, [("content-type", "application/json")], close)

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        data: bytes,
        headers: list[tuple[str, str]],
        close: bool = False,
    ) -> None:
        headers = [*headers, ("content-length", str(len(data)))]
        if close:
            headers.append(("connection", "close"))
        out = conn.send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
        await _write(writer, out + conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage()))


async def _write(writer: asyncio.StreamWriter, data: bytes | None) -> None:
    if writer.is_closing():
        raise _Gone()
    writer.write(data or b"")
    await writer.drain()


async def _watch_eof(conn: h11.Connection, reader: asyncio.StreamReader) -> None:
    """Returns when the client closes its side; bytes of a pipelined next request go to h11's buffer."""
    while True:
        data = await reader.read(_READ)
        if not data:
            return
        conn.receive_data(data)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _only(method: str, allowed: str) -> None:
    if method != allowed:
        raise ApiError(405, f"use {allowed} on this route", code="method_not_allowed")


def _model(completer: Completer) -> dict[str, Any]:
    return {"id": completer.model, "object": "model", "created": 0, "owned_by": "wisp"}
