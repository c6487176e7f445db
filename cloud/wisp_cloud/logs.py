"""Server logs that a client cannot forge: one structured event per line, as `key=value` text or as JSON.

`log_event` logs a `LogEvent` object as the record's message: the text format renders it lazily as
`event k=v k=v` (a value with spaces, quotes, `=`, control or non-ASCII characters is written as a Python string
literal), and `JsonFormatter` (`wisp serve --log-format json`) writes one JSON object per line with the fields as
JSON values (anything not a number, bool or null as a JSON string). Either way a client-supplied value (a Hello's
`client`, an error message) can never start a line or add a field.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import queue
import re
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_PLAIN = re.compile(r"[A-Za-z0-9_.:/+\-@,\[\]{}()<>|#%*]*")


@dataclass(frozen=True)
class LogEvent:
    """One event and its fields; `str()` is the text format's line."""

    event: str
    fields: dict[str, object]

    def __str__(self) -> str:
        parts = [self.event]
        for key, value in self.fields.items():
            text = f"{value:.3f}" if isinstance(value, float) else str(value)
            parts.append(f"{key}={text}" if _PLAIN.fullmatch(text) else f"{key}={text!r}")
        return " ".join(parts)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: object) -> None:
    """One structured line: `event k=v k=v` (text) or `{"event": ..., "k": v}` (JSON)."""
    if logger.isEnabledFor(level):
        logger.log(level, LogEvent(event, fields))


def _json_value(value: object) -> object:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, then the event and its fields, or `msg` for a
    plain log call; a traceback (server faults only, never client errors) goes in `exc` as one string."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out: dict[str, object] = {"ts": ts, "level": record.levelname, "logger": record.name}
        if isinstance(record.msg, LogEvent):
            out["event"] = record.msg.event
            for key, value in record.msg.fields.items():
                if key not in out:  # a field never overwrites the envelope
                    out[key] = _json_value(value)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(out, ensure_ascii=True, allow_nan=False)


def use_log_format(fmt: str, root: logging.Logger | None = None) -> None:
    """Give every handler of the root logger the chosen format (`wisp serve --log-format`)."""
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    for handler in (root or logging.getLogger()).handlers:
        handler.setFormatter(formatter)


def say(line: str) -> None:
    """A line another process reads on our stdout (`listening on …`, a replica's address, a control answer): one
    write, newline included, then flushed. `print` writes the end apart, and a log line from another thread fell
    between them where stderr shares stdout's pipe (`wisp cluster`'s replicas, with `logs_off_loop`): the cluster
    read the port as "33913" followed by the log line's date."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class _Handoff(logging.handlers.QueueHandler):
    """Hands a record to the listener as it is: formatted there, so a `LogEvent` reaches `JsonFormatter` whole."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


@contextlib.contextmanager
def logs_off_loop(root: logging.Logger | None = None) -> Iterator[None]:
    """While inside: the root logger's handlers format and write on a thread of their own, and a log call costs the
    caller one queue put. The server logs every session's open and end (and WISP every move between the edge and
    the server, and its regime's decisions) from the event loop; on an H200 host (run 63, centralized, 7B) the
    handler's write to the bench's log file took ≈ 0.4 ms a line, 2.4 % of the loop's time. The queue is
    unbounded: the server writes tens to a few hundred lines a second. On leaving, the queue is drained and the
    handlers are put back."""
    root = root or logging.getLogger()
    handlers = list(root.handlers)
    listener = logging.handlers.QueueListener(queue.SimpleQueue(), *handlers, respect_handler_level=True)
    handoff = _Handoff(listener.queue)
    for handler in handlers:
        root.removeHandler(handler)
    root.addHandler(handoff)
    listener.start()
    try:
        yield
    finally:
        for handler in handlers:  # back first: a record logged meanwhile is never dropped
            root.addHandler(handler)
        root.removeHandler(handoff)
        listener.stop()
