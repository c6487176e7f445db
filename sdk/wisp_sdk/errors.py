"""Exceptions shared by every WISP package.

The CLI prints a `WispError` as one clear line (no traceback); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class WispError(Exception):
    """A user-facing error: the message alone must tell the user what went wrong and what to do."""


class ProtocolError(WispError):
    """A frame that does not follow the wire protocol (bad encoding, unknown type, wrong sizes)."""


class ServerError(WispError):
    """An error frame received from the verifier; `code` is one of `protocol.ErrorCode`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
