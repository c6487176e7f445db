"""`Replica`: one `wisp serve` process of a cluster, on a loopback port, that can be drained, killed and restarted.

The replica runs in its own session (process group), so a Ctrl-C at the terminal reaches only `wisp cluster`,
which then drains every replica itself. Its output goes to the cluster's stderr, each line prefixed `[rI]`.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import TextIO

from wisp_sdk.errors import WispError

_LISTENING = re.compile(r"listening on (wss?)://(\S+):(\d+)")


class Replica:
    def __init__(
        self,
        index: int,
        serve_args: list[str],
        *,
        env: dict[str, str] | None = None,
        log: TextIO | None = None,
    ) -> None:
        self.index = index
        self.name = f"r{index}"
        self.serve_args = serve_args
        self.env = env or {}
        self.log = log if log is not None else sys.stderr
        self.port = (
            0  # 0 until the first start picked a free one; restarts keep it (the balancer's config names it)
        )
        self.proc: subprocess.Popen[str] | None = None
        self.exit_reported = False

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def launch(self) -> threading.Event:
        """Start the process; the returned event is set once it printed its address (or exited)."""
        cmd = [sys.executable, "-m", "wisp_sdk.cli", "serve", *self.serve_args]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.exit_reported = False
        listening = threading.Event()
        threading.Thread(
            target=self._pump, args=(self.proc, listening), name=f"wisp-{self.name}-log", daemon=True
        ).start()
        return listening

    def _pump(self, proc: subprocess.Popen[str], listening: threading.Event) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = _LISTENING.search(line)
            if m and not listening.is_set():
                self.port = int(m.group(3))
                listening.set()
            self.log.write(f"[{self.name}] {line}")
            self.log.flush()
        listening.set()  # it exited: whoever waits must not wait for the timeout

    def wait_ready(self, listening: threading.Event, timeout_s: float, abort: threading.Event) -> None:
        """Wait for the `listening on` line, then for `GET /ready` to answer 200."""
        end = time.monotonic() + timeout_s
        while not listening.wait(0.2):
            self._check(end, abort)
        while not self.ready():
            self._check(end, abort)
            time.sleep(0.1)

    def _check(self, end: float, abort: threading.Event) -> None:
        if abort.is_set():
            raise WispError("stopped while starting the replicas")
        if self.proc is not None and self.proc.poll() is not None:
            raise WispError(f"replica {self.index} exited with code {self.proc.returncode} while starting")
        if time.monotonic() > end:
            raise WispError(f"replica {self.index} was not ready in time")

    def ready(self) -> bool:
        if not self.port or self.proc is None or self.proc.poll() is not None:
            return False
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2.0)
        try:
            conn.request("GET", "/ready")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def drain(self) -> None:
        """SIGTERM: `wisp serve` stops taking sessions, finishes its rounds in flight, then exits."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()

    def wait(self, timeout_s: float) -> bool:
        """True once the process has exited; kills it after `timeout_s`."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return False
        return True
