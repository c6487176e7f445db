"""The real `wisp` CLI in a subprocess for end-to-end tests: `wisp serve` and `wisp edge serve`, ready once they
print the address they listen on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path


class CliProcess:
    """`python -m wisp_sdk.cli ARGS` with its output pumped into `lines`; `address` is the first match of
    `listening on (PATTERN)`, and the constructor raises with the output's tail if none comes in `timeout`."""

    def __init__(
        self, args: list[str], pattern: str, timeout: float, env: dict[str, str] | None = None
    ) -> None:
        cmd = [sys.executable, "-m", "wisp_sdk.cli", *args]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env
        )
        self.lines: list[str] = []
        found = threading.Event()
        self.address = ""

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(rf"listening on ({pattern})", line)
                if m and not found.is_set():
                    self.address = m.group(1)
                    found.set()
            found.set()  # the process ended without saying it listens

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(timeout) or not self.address:
            self.kill()
            raise RuntimeError(f"wisp {' '.join(args)} did not start:\n" + "".join(self.lines[-30:]))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class ServerProcess(CliProcess):
    """`wisp serve --target TARGET --port PORT EXTRA...`; `url` (ws:// or wss://) and `port` once it listens."""

    def __init__(self, target: Path, port: int = 0, *extra: str, timeout: float = 180.0) -> None:
        args = ["serve", "--target", str(target), "--port", str(port), *extra]
        super().__init__(args, r"wss?://\S+", timeout)
        self.url = self.address
        self.port = int(self.url.rsplit(":", 1)[1])


class EdgeProcess(CliProcess):
    """`wisp edge serve` drafting with `bundle` against `server_url`; `base` (http://HOST:PORT) once it listens."""

    def __init__(
        self, server_url: str, bundle: Path, *extra: str, token: str, timeout: float = 120.0
    ) -> None:
        args = ["edge", "serve", "--server", server_url, "--draft", str(bundle), "--port", "0"]
        args += ["--threads", "1", *extra]
        super().__init__(args, r"http://\S+", timeout, env={"WISP_TOKEN": token})
        self.base = self.address
