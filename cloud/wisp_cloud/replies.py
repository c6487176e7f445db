"""What the engine hands back to the gateway: replies to send, and refusals (typed errors) to answer with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel
from wisp_sdk.protocol import ErrorCode


class Peer(Protocol):
    """The gateway's handle on one connection. The engine only carries it (on the session, in replies)."""

    def send(self, data: str | bytes) -> None: ...


class Refusal(Exception):
    """A request answered with an Error frame of `code`; `fatal` closes the connection afterwards."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        session_id: str | None = None,
        round: int | None = None,
        fatal: bool = False,
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.session_id, self.round, self.fatal = (
            code,
            message,
            session_id,
            round,
            fatal,
        )


@dataclass(slots=True)
class Reply:
    """One frame for one connection: a message, a frame already encoded (a Verdict's bytes, a Tokens JSON text:
    the hot paths), or a refusal
    that the gateway answers with an Error frame. `conn` is the gateway's connection object; the engine only
    carries it (it never touches a socket).
    """

    conn: Peer
    message: BaseModel | bytes | str | Refusal
