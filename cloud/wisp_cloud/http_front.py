"""One port for the websocket and plain HTTP: the first request head of a connection decides who serves it.

websockets' HTTP parser takes only GET, so the OpenAI routes' POSTs cannot go through its `process_request`.
Every accepted connection starts with a `Sniffer` (websockets' `create_connection` hook builds it in place of its
`ServerConnection`); once the head is complete, a websocket upgrade is handed to the `ServerConnection` it would
have been (the handshake, keepalive and close stay websockets'), and anything else to the h11 HTTP handler. The
bytes read so far are replayed into whichever takes over, so the handover costs one head scan per connection
and nothing per frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

_MAX_HEAD = 16384


def is_upgrade(head: bytes) -> bool:
    """Whether a request head (up to the blank line) asks for a websocket upgrade."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


class Sniffer(asyncio.Protocol):
    """Reads a connection's request head, then hands the transport to the websocket or the HTTP side."""

    def __init__(
        self,
        protocol: Any,
        websocket: Callable[[], asyncio.Protocol],
        http: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        head_timeout_s: float,
    ) -> None:
        self.protocol = protocol  # websockets' sans-I/O protocol: its subprotocol hook checks it is ours
        self._websocket = websocket
        self._http = http
        self._timeout_s = head_timeout_s
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport, though not always an asyncio.Transport subclass (uvloop's, which SGLang installs)
        self._transport = cast(asyncio.Transport, transport)
        # A connection that never completes its head holds a descriptor and nothing else: closed at the deadline.
        self._timer = asyncio.get_running_loop().call_later(self._timeout_s, self._transport.abort)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > _MAX_HEAD:
                transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\r\n")
                transport.close()
            return
        if self._timer is not None:
            self._timer.cancel()
        taker: asyncio.Protocol
        if is_upgrade(bytes(self._buf[:end])):
            taker = self._websocket()
        else:
            taker = asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=_MAX_HEAD), self._http)
        transport.set_protocol(taker)
        taker.connection_made(transport)
        taker.data_received(bytes(self._buf))
        self._buf.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
