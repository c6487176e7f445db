"""What retrying cannot fix fails at once, with one clear error: a bad URL, a down server (within the connect
timeout), TLS verification, and the CA option that fixes it."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from cli_process import ServerProcess
from wisp_sdk import EdgeClient, WispError
from wisp_sdk.client import AsyncEdgeClient

PROMPT = [5, 17, 33, 60]


@pytest.mark.parametrize("url", ["http://127.0.0.1:8765", "127.0.0.1:8765", "ws://", "wss:///x"])
def test_bad_url_scheme_is_refused_at_once(url, tiny_bundle):
    t0 = time.monotonic()
    with pytest.raises(WispError, match="ws://HOST:PORT"):
        AsyncEdgeClient(url, str(tiny_bundle))
    assert time.monotonic() - t0 < 2.0


def test_down_server_fails_within_the_connect_timeout(tiny_bundle):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with EdgeClient(f"ws://127.0.0.1:{port}", str(tiny_bundle), connect_timeout_s=1.0) as c:
        t0 = time.monotonic()
        with pytest.raises(WispError):
            c.generate(PROMPT, max_new_tokens=4)
        took = time.monotonic() - t0
    assert took < 5.0, f"a down server took {took:.1f}s to fail"


def test_tls_verification_fails_fast_and_a_ca_file_fixes_it(tiny_target, tiny_bundle, tmp_path):
    from ws_client import self_signed_cert

    cert, key = self_signed_cert(tmp_path)
    server = ServerProcess(tiny_target, 0, "--threads", "1", "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        url = server.url.replace("ws://", "wss://")
        assert url.startswith("wss://")
        with EdgeClient(url, str(tiny_bundle)) as c:
            t0 = time.monotonic()
            with pytest.raises(WispError, match="TLS verification"):
                c.generate(PROMPT, max_new_tokens=4)
            assert time.monotonic() - t0 < 5.0
        with EdgeClient(url, str(tiny_bundle), ca_file=cert) as c:
            assert len(c.generate(PROMPT, max_new_tokens=4).token_ids) == 4
        with pytest.raises(WispError, match="CA file"):
            AsyncEdgeClient(url, str(tiny_bundle), ca_file=tmp_path / "missing.pem")
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--temperature", "-1", "at least 0"),
        ("--temperature", "1e-40", "at least 0.001"),
        ("--top-p", "1.5", "at most 1"),
        ("--max-new-tokens", "0", "at least 1"),
        ("--top-k", "x", "not an integer"),
    ],
)
def test_generate_flags_are_checked_at_parse_time(flag, value, says):
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "wisp_sdk.cli", "generate", "--server", "ws://127.0.0.1:1", "--draft", "/x", flag, value, "hi"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"argument {flag}: " in out.stderr and says in out.stderr
