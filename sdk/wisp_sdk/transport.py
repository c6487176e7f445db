"""The client's link to the verifier: one websocket (connect + Hello, send, receive), reconnect with backoff, and
the load balancer's affinity cookie.

Behind a load balancer (docs/deploy.md) a session's KV lives on one replica. The balancer names that replica in
a cookie on the websocket upgrade response (HAProxy: `cookie SRV insert`); `AffinityCookies` keeps it and every
later connect sends it back, so a resumed session reaches the replica that holds it. A replica that died is
replaced by the balancer (which then sets a new cookie); the new replica answers `unknown_session` and the
client rebuilds the session from its committed context. A refused `Open` (`overloaded`) forgets the cookie, so
the next connect may land on another replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlparse

from wisp_sdk.errors import ProtocolError, ServerError, WispError
from wisp_sdk.protocol import (
    SUBPROTOCOL,
    Close,
    Closed,
    Error,
    ErrorCode,
    Hello,
    Resumed,
    Verdict,
    Welcome,
    decode_server,
    encode,
)
from wisp_sdk.session import Session


class SessionLost(Exception):
    """The server answered unknown_session: rebuild from the committed context."""


class LinkDown(Exception):
    """No usable connection (closed, refused, or a response timed out)."""


class Backoff:
    """Exponential backoff: `initial_s`, doubling up to `max_s`."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.max_s = max_s
        self._next = initial_s

    def next_s(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.max_s)
        return delay


class AffinityCookies:
    """The cookies a load balancer set on an upgrade response, sent back on every later connect."""

    def __init__(self) -> None:
        self._jar: dict[str, str] = {}  # cookie name -> value, as the server set them

    def update(self, set_cookie_headers: list[str]) -> None:
        for header in set_cookie_headers:
            parsed: SimpleCookie = SimpleCookie()
            with contextlib.suppress(CookieError):  # a malformed cookie is the balancer's problem, not ours
                parsed.load(header)
            for name, morsel in parsed.items():
                if morsel["max-age"] in ("0", "-1") or not morsel.value:
                    self._jar.pop(name, None)  # the server deleted it
                else:
                    self._jar[name] = morsel.value

    def header(self) -> str | None:
        """The `Cookie` request header, or None when there is nothing to send."""
        return "; ".join(f"{k}={v}" for k, v in self._jar.items()) or None

    def clear(self) -> None:
        self._jar.clear()

    def __len__(self) -> int:
        return len(self._jar)


def tls_context(
    server: str, ca_file: str | Path | None, ssl_context: ssl.SSLContext | None
) -> ssl.SSLContext | None:
    """Check the server URL and build the TLS context `ca_file` asks for (None: websockets' default)."""
    url = urlparse(server)
    if url.scheme not in ("ws", "wss") or not url.hostname:
        raise WispError(f"server URL must look like ws://HOST:PORT or wss://HOST:PORT, not {server!r}")
    if ca_file is not None and ssl_context is not None:
        raise WispError("give ca_file or ssl_context, not both")
    if ca_file is None:
        return ssl_context
    if url.scheme != "wss":
        raise WispError("ca_file is for wss:// servers")
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise WispError(f"cannot load CA file {ca_file}: {exc}") from exc


class Transport:
    """One websocket to `server` at a time; `connect` also says Hello and keeps the Welcome."""

    def __init__(
        self,
        server: str,
        *,
        fingerprint: str,
        token: str | None,
        ssl_context: ssl.SSLContext | None,
        connect_timeout_s: float,
        response_timeout_s: float,
        backoff_initial_s: float,
        backoff_max_s: float,
    ) -> None:
        self.server = server
        self.fingerprint = fingerprint
        self.token = token
        self.ssl_context = ssl_context
        self.connect_timeout_s = connect_timeout_s
        self.response_timeout_s = response_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.cookies = AffinityCookies()
        self.welcome: Welcome | None = None
        self.rtt_ms = 20.0  # measured by the last connect
        self._ws: Any = None

    @classmethod
    def like(cls, other: Transport) -> Self:
        """A new, unconnected transport with `other`'s settings and no cookies (one per emulated device)."""
        return cls(
            other.server,
            fingerprint=other.fingerprint,
            token=other.token,
            ssl_context=other.ssl_context,
            connect_timeout_s=other.connect_timeout_s,
            response_timeout_s=other.response_timeout_s,
            backoff_initial_s=other.backoff_initial_s,
            backoff_max_s=other.backoff_max_s,
        )

    @property
    def connected(self) -> bool:
        return self._ws is not None

    def backoff(self) -> Backoff:
        """A fresh backoff with this link's settings (reconnects here, refused Opens in the generation loop)."""
        return Backoff(self.backoff_initial_s, self.backoff_max_s)

    async def connect(self) -> None:
        from websockets.asyncio.client import connect

        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
            self._ws = None
        headers: dict[str, str] = {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        cookie = self.cookies.header()
        if cookie:
            headers["Cookie"] = cookie
        # websockets makes a default TLS context for wss:// when none is given (and refuses ssl=None)
        tls: dict[str, Any] = {"ssl": self.ssl_context} if self.ssl_context is not None else {}
        t0 = time.perf_counter()
        try:
            ws = await asyncio.wait_for(
                connect(
                    self.server,
                    subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                    additional_headers=headers or None,
                    max_size=None,
                    open_timeout=self.connect_timeout_s,
                    **tls,
                    ping_interval=10,
                    ping_timeout=max(10.0, self.response_timeout_s),
                    close_timeout=2.0,  # a dead peer must not hold up close()
                ),
                self.connect_timeout_s,
            )
        except ssl.SSLCertVerificationError as exc:  # retrying cannot fix it
            raise WispError(
                f"TLS verification of {self.server} failed: {exc.verify_message or exc}; "
                "give the server's CA (ca_file=, or --ca-file)"
            ) from exc
        except (OSError, asyncio.TimeoutError) as exc:
            raise LinkDown(f"cannot connect to {self.server}: {exc}") from exc
        except Exception as exc:  # websockets' handshake errors (InvalidStatus on 401/403, ...)
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403) or "401" in str(exc) or "403" in str(exc):
                raise ServerError("unauthorized", f"the server refused the connection: {exc}") from exc
            if status is not None and 400 <= status < 500:  # a wrong path or not a WISP server
                raise WispError(f"{self.server} refused the websocket upgrade: {exc}") from exc
            # 5xx: e.g. a balancer with no replica up (503) or one that failed (502): retry
            raise LinkDown(f"websocket handshake with {self.server} failed: {exc}") from exc
        if ws.response is not None:
            self.cookies.update(ws.response.headers.get_all("Set-Cookie"))
        self._ws = ws
        await self.send(Hello(tokenizer_fingerprint=self.fingerprint, auth_token=self.token))
        msg, _ = await self.recv()
        if not isinstance(msg, Welcome):
            raise ProtocolError(f"expected welcome, got {type(msg).__name__}")
        self.rtt_ms = (time.perf_counter() - t0) * 1000.0 / 2  # connect + hello ~ two round trips
        self.welcome = msg

    async def send(self, msg: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        if self._ws is None:
            raise LinkDown("not connected")
        try:
            await self._ws.send(encode(msg))
        except (ConnectionClosed, OSError) as exc:
            raise LinkDown(f"connection lost while sending: {exc}") from exc

    async def recv(self) -> tuple[Any, float]:
        """The next server message and its arrival time; Error frames become exceptions."""
        from websockets.exceptions import ConnectionClosed

        if self._ws is None:
            raise LinkDown("not connected")
        try:
            frame = await asyncio.wait_for(self._ws.recv(), self.response_timeout_s)
        except (ConnectionClosed, OSError) as exc:
            raise LinkDown(f"connection lost: {exc}") from exc
        except asyncio.TimeoutError as exc:
            raise LinkDown(f"no answer from the server within {self.response_timeout_s:.0f}s") from exc
        arrived = time.perf_counter()
        msg = decode_server(frame)
        if isinstance(msg, Error):
            if msg.code == ErrorCode.unknown_session:
                raise SessionLost(msg.message)
            raise ServerError(msg.code.value, msg.message)
        return msg, arrived

    async def recv_expect(self, sess: Session, kind: type | tuple[type, ...]) -> tuple[Any, float]:
        """Skip frames that are not for us now (e.g. a stale verdict) until a `kind` message arrives."""
        while True:
            msg, arrived = await self.recv()
            if isinstance(msg, kind):
                if isinstance(msg, Verdict) and (sess.inflight is None or msg.round != sess.inflight.round):
                    continue
                return msg, arrived

    async def recover(self, sess: Session, deadline: float, why: BaseException, window_s: float) -> str:
        """Reconnect with backoff; returns 'resumed' or 'reopen'. Raises WispError after the deadline."""
        self.drop()
        backoff = self.backoff()
        last: BaseException = why
        while True:
            if time.monotonic() > deadline:
                if sess.session_id is None and not sess.generated:
                    raise WispError(f"could not reach {self.server} within {window_s:.0f}s ({last})")
                raise WispError(
                    f"lost the connection to {self.server} and could not resume within "
                    f"{window_s:.0f}s (last error: {last})"
                )
            try:
                await self.connect()
                if sess.session_id is None:
                    return "reopen"  # the session was never opened: nothing to resume
                await self.send(sess.resume_message())
                msg, _ = await self.recv_expect(sess, Resumed)
                return "resumed" if sess.on_resumed(msg) is not False else "reopen"
            except SessionLost:
                return "reopen"
            except LinkDown as exc:
                last = exc
                self.drop()
                await asyncio.sleep(min(backoff.next_s(), max(0.0, deadline - time.monotonic())))

    async def close_session(self, close: Close) -> None:
        """Send `close` and wait for its `Closed` (an Error for it, e.g. already expired, raises)."""
        await self.send(close)
        while True:
            msg, _ = await self.recv()
            if isinstance(msg, Closed) and msg.session_id == close.session_id:
                return

    def forget_replica(self) -> None:
        """A replica refused a new session: drop the link and its cookie, so the balancer may pick another."""
        self.drop()
        self.cookies.clear()

    def drop(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            # Don't wait for a closing handshake on a dead link; let the transport go.
            with contextlib.suppress(Exception):
                ws.transport.abort()

    async def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
            self._ws = None
