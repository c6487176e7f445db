"""Server logs: the text and JSON formats, and that a client-supplied value cannot forge a line in either.

In-process: the real gateway and engine with `FakeBackend` over loopback websockets. Through the CLI: a real
`wisp serve --log-format json` subprocess on the tiny target.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
from pathlib import Path

import pytest
from test_cloud_cli import start_server
from test_gateway_limits import Srv, _hello, _ws
from websockets.asyncio.client import connect
from wisp_cloud.logs import JsonFormatter, LogEvent, log_event, logs_off_loop, use_log_format
from wisp_sdk.bundle import tokenizer_fingerprint
from wisp_sdk.protocol import SUBPROTOCOL, Hello, decode_server, encode

FORGED = (
    'evil"}\n{"ts":"x","level":"INFO","logger":"wisp.server","event":"session_open"}\nINFO session_open x=1'
)


def _capture(fmt: logging.Formatter) -> tuple[logging.Handler, io.StringIO]:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(fmt)
    return handler, buf


def _serve_hello(fmt: logging.Formatter) -> str:
    handler, buf = _capture(fmt)
    logger = logging.getLogger("wisp")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)

    async def main() -> None:
        async with Srv() as server:
            ws = await _ws(server)
            await _hello(ws, client=FORGED)
            await ws.close()

    try:
        asyncio.run(main())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return buf.getvalue()


def test_json_log_is_one_object_per_line_and_cannot_be_forged():
    lines = _serve_hello(JsonFormatter()).splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    hello = [r for r in records if r.get("event") == "hello"]
    assert len(hello) == 1 and hello[0]["client"] == FORGED  # the value survives, as a string
    assert not any(r.get("event") == "session_open" for r in records)
    assert all({"ts", "level", "logger"} <= r.keys() for r in records)
    assert hello[0]["logger"] == "wisp.server" and hello[0]["level"] == "INFO"


def test_text_log_quotes_client_values():
    text = _serve_hello(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    lines = text.splitlines()
    hello = [ln for ln in lines if ": hello " in ln]
    assert len(hello) == 1 and "client='evil" in hello[0]
    assert not any(ln.split(": ", 1)[-1].startswith("session_open") for ln in lines)


def test_json_field_types_and_envelope():
    rec = logging.LogRecord("wisp.x", logging.WARNING, __file__, 1, LogEvent("e", {}), None, None)
    rec.msg = LogEvent(
        "step", {"n": 3, "ms": 1.5, "ok": True, "none": None, "nan": float("nan"), "level": "x"}
    )
    out = json.loads(JsonFormatter().format(rec))
    assert out["event"] == "step" and out["n"] == 3 and out["ms"] == 1.5 and out["ok"] is True
    assert out["none"] is None and out["nan"] == "nan" and out["level"] == "WARNING"  # envelope wins
    plain = logging.LogRecord("wisp.x", logging.ERROR, __file__, 1, "boom %s", ("\n",), None)
    try:
        raise ValueError("inner")
    except ValueError:
        import sys

        plain.exc_info = sys.exc_info()
    line = JsonFormatter().format(plain)
    assert (
        "\n" not in line and json.loads(line)["msg"] == "boom \n" and "ValueError" in json.loads(line)["exc"]
    )
    assert str(LogEvent("a", {"k": "v w", "f": 0.5})) == "a k='v w' f=0.500"


def test_use_log_format_sets_every_root_handler():
    root = logging.Logger("r")
    h1, h2 = logging.StreamHandler(io.StringIO()), logging.StreamHandler(io.StringIO())
    root.addHandler(h1)
    root.addHandler(h2)
    use_log_format("json", root)
    assert isinstance(h1.formatter, JsonFormatter) and isinstance(h2.formatter, JsonFormatter)
    use_log_format("text", root)
    assert not isinstance(h1.formatter, JsonFormatter)
    log_event(logging.getLogger("wisp.quiet"), "x", level=logging.DEBUG)  # disabled level: nothing built


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_cli_log_format(tiny_target, fmt):
    proc, url = start_server(tiny_target, "--threads", "1", "--log-format", fmt)
    fp = tokenizer_fingerprint(Path(tiny_target) / "tokenizer.json")

    async def main() -> None:
        async with connect(url, subprotocols=[SUBPROTOCOL]) as ws:
            await ws.send(encode(Hello(tokenizer_fingerprint=fp, client=FORGED)))
            assert decode_server(await ws.recv()).type == "welcome"

    try:
        asyncio.run(main())
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert rc == 0, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if fmt == "json":
        records = [json.loads(ln) for ln in lines]
        assert [r["client"] for r in records if r.get("event") == "hello"] == [FORGED]
        assert any(r.get("event") == "server_stop" for r in records)
    else:
        assert sum(" hello client=" in ln for ln in lines) == 1
        assert not any(ln.lstrip().startswith("{") or ln.startswith("INFO session_open") for ln in lines)


def test_logs_off_loop_writes_from_its_own_thread_and_puts_the_handlers_back():
    """`wisp serve` logs through `logs_off_loop`: the handler writes on the listener's thread, a `LogEvent` still
    reaches the JSON formatter whole (its fields as JSON values), and on leaving every record is written and the
    handlers are as before."""
    import threading

    class Recording(logging.StreamHandler):
        threads: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.threads.append(threading.current_thread().name)
            super().emit(record)

    root = logging.Logger("r")
    out = io.StringIO()
    handler = Recording(out)
    root.addHandler(handler)
    use_log_format("json", root)
    with logs_off_loop(root):
        assert root.handlers != [handler]
        for i in range(100):
            log_event(root, "session_open", session=f"s{i}", n=i, ratio=0.5)
    assert root.handlers == [handler]
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["n"] for x in lines] == list(range(100)) and lines[0]["event"] == "session_open"
    assert lines[0]["ratio"] == 0.5 and threading.main_thread().name not in handler.threads
