"""The server under test of `wisp bench`: `wisp serve ... --policy P --port 0` as a subprocess.

With `control=True` the server reads `policy NAME [FLAG...]` lines on stdin (`wisp serve --control-stdin`): the bench
then loads the model and captures its CUDA graphs once and switches the policy between arms (a fresh engine and a
fresh copy of the start-up estimator each time; WispServer.switch_policy; FLAGs such as `no-fill` or `refuse` set a
WISP switch for one arm: config.ARM_FLAGS). A `stats` line answers with the engine's counters (WispServer.stats) as one JSON line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from wisp_sdk.errors import WispError

_LISTEN = re.compile(r"listening on (wss?://\S+)")
_READY = re.compile(r"^policy (\S+) ready$")
_STATS = "stats "


class ServerProc:
    """`wisp serve ... --policy P --port 0` as a subprocess; its log goes to `log_path`."""

    def __init__(
        self,
        serve_args: list[str],
        policy: str,
        log_path: Path,
        startup_s: float = 600.0,
        server_cmd: list[str] | None = None,
        control: bool = False,
    ) -> None:
        prefix = server_cmd or [sys.executable, "-m", "wisp_sdk.cli", "serve"]
        extra = ["--control-stdin"] if control else []
        self.cmd = [*prefix, *serve_args, *extra, "--policy", policy, "--port", "0"]
        self.control = control
        self.policy = policy
        self.lines: list[str] = []
        self.log_path = log_path
        self.startup_s = startup_s
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self._ready: list[str] = []
        self._stats: list[dict] = []
        self.flags: tuple[str, ...] = ()

    def __enter__(self) -> ServerProc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.PIPE if self.control else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            env=os.environ.copy(),
        )
        found: list[str] = []

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.strip())
                m = _LISTEN.search(line)
                if m and not found:
                    found.append(m.group(1))
                r = _READY.match(line.strip())
                if r:
                    self._ready.append(r.group(1))
                elif line.startswith(_STATS):
                    self._stats.append(json.loads(line[len(_STATS) :]))

        threading.Thread(target=read, daemon=True).start()
        self._wait(lambda: bool(found), self.startup_s, "start")
        self.url = found[0]
        return self

    def _wait(self, done, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while not done():
            if self.proc.poll() is not None:
                self._log.flush()
                tail = self.log_path.read_text()[-2000:]
                raise WispError(f"server exited ({self.proc.returncode}): {' '.join(self.cmd)}\n{tail}")
            if time.monotonic() > deadline:
                self.__exit__()
                raise WispError(f"server did not {what} within {timeout_s:.0f}s: {' '.join(self.cmd)}")
            time.sleep(0.1)

    def switch(self, policy: str, flags: tuple[str, ...] = (), timeout_s: float = 120.0) -> None:
        """The next arm: the same process serves `policy` with `flags` (needs `control=True`)."""
        if policy == self.policy and tuple(flags) == self.flags:
            return
        assert self.control and self.proc is not None and self.proc.stdin is not None
        n = len(self._ready)
        self.proc.stdin.write(" ".join(["policy", policy, *flags]) + "\n")
        self.proc.stdin.flush()
        self._wait(lambda: len(self._ready) > n, timeout_s, f"switch to {policy}")
        self.policy, self.flags = policy, tuple(flags)

    def stats(self, timeout_s: float = 30.0) -> dict:
        """The engine's counters now (policy counters, session switches, steps, mean batch): cumulative per arm."""
        assert self.control and self.proc is not None and self.proc.stdin is not None
        n = len(self._stats)
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        self._wait(lambda: len(self._stats) > n, timeout_s, "answer stats")
        return self._stats[-1]

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
        if getattr(self, "_log", None):
            self._log.close()
