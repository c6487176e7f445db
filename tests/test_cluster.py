"""`wisp cluster` end to end on the CPU: two real `wisp serve` replicas behind a real HAProxy, real SDK clients.

One cluster serves the whole module (starting replicas is the slow part), in this order: eight concurrent
greedy generations; a rolling restart (SIGHUP: drain one replica, start it again, then the other) while clients
generate; kill -9 of a replica mid-generation; SIGTERM of the cluster. Every output must be token-identical
to the target's own greedy decode.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from wisp_sdk import FixedK
from wisp_sdk.client import AsyncEdgeClient, GenerationResult

N_NEW = 32
PROMPTS = [[5 + i, 17, 33 + 2 * i, 60, 71 + i] for i in range(8)]

if shutil.which("haproxy") is None:
    if os.environ.get("CI"):  # CI must run these: .ci/run installs haproxy
        raise RuntimeError("haproxy is not installed, and CI must run tests/test_cluster.py")
    pytest.skip("haproxy is not installed (apt-get install haproxy)", allow_module_level=True)


class ClusterProcess:
    """`wisp cluster` in a subprocess; its stdout lines (`listening on`, `replica I pid PID URL`) as they come."""

    def __init__(self, log: Path, *args: str, timeout: float = 120.0) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wisp_sdk.cli", "cluster", *args],
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()
        self.wait_for(lambda: self.replicas(2) is not None, timeout)
        first = self.lines[0]
        m = re.fullmatch(r"listening on (ws://\S+):(\d+)\n", first)
        assert m, first
        self.url, self.port = f"{m.group(1)}:{m.group(2)}", int(m.group(2))

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, done, timeout: float) -> None:
        end = time.monotonic() + timeout
        with self.changed:
            while not done():
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise AssertionError(f"wisp cluster: {self.lines}\n{self.log.read_text()[-4000:]}")
                self.changed.wait(0.5)

    def replicas(self, n: int, after: int = 0) -> list[tuple[int, str]] | None:
        """The (pid, url) of replicas 0..n-1 from the `replica` lines printed after line `after`."""
        found: dict[int, tuple[int, str]] = {}
        for line in self.lines[after:]:
            m = re.fullmatch(r"replica (\d+) pid (\d+) (ws://\S+)\n", line)
            if m:
                found[int(m.group(1))] = (int(m.group(2)), m.group(3))
        return [found[i] for i in range(n)] if len(found) >= n else None


def _sessions_opened(replica_url: str) -> float:
    text = (
        urllib.request.urlopen(replica_url.replace("ws://", "http://") + "/metrics", timeout=5)
        .read()
        .decode()
    )
    return sum(
        float(v) for v in re.findall(r'^wisp_sessions_opened_total\{mode="speculative"\} (\S+)$', text, re.M)
    )


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie (not reaped yet) counts as gone
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


@pytest.fixture(scope="module")
def cluster(tiny_target, tmp_path_factory):
    c = ClusterProcess(
        tmp_path_factory.mktemp("cluster") / "stderr.log",
        "--replicas",
        "2",
        "--target",
        str(tiny_target),
        "--port",
        "0",
        "--threads",
        "1",
        "--drain-s",
        "1",
    )
    yield c
    if c.proc.poll() is None:
        c.proc.kill()
        c.proc.wait(10)


@pytest.fixture(scope="module")
def references(reference) -> list[list[int]]:
    return [reference(p, N_NEW) for p in PROMPTS]


async def _generate(
    url: str, bundle: Path, on_delta=None, until: threading.Event | None = None
) -> list[list[GenerationResult]]:
    """Every prompt on its own client, all at once; each client generates once, or again and again on its
    connection until `until` is set."""
    clients = [AsyncEdgeClient(url, bundle, threads=1, resume_deadline_s=60) for _ in PROMPTS]

    async def one(i: int) -> list[GenerationResult]:
        out: list[GenerationResult] = []
        while not out or (until is not None and not until.is_set()):
            async for _ in clients[i].stream(PROMPTS[i], max_new_tokens=N_NEW, controller=FixedK(2)):
                if on_delta is not None:
                    on_delta(i)
            assert clients[i].last_result is not None
            out.append(clients[i].last_result)
        return out

    try:
        return list(await asyncio.gather(*(one(i) for i in range(len(PROMPTS)))))
    finally:
        for c in clients:
            await c.aclose()


def _assert_identical(results: list[list[GenerationResult]], references: list[list[int]]) -> None:
    for i, per_client in enumerate(results):
        for res in per_client:
            assert res.token_ids == references[i], f"prompt {i} diverged from the target's greedy decode"


def test_eight_concurrent_generations_spread_over_both_replicas(cluster, tiny_bundle, references):
    replicas = cluster.replicas(2)
    assert replicas is not None
    before = [_sessions_opened(url) for _, url in replicas]
    results = asyncio.run(_generate(cluster.url, tiny_bundle))
    _assert_identical(results, references)
    opened = [_sessions_opened(url) - b for (_, url), b in zip(replicas, before, strict=True)]
    assert sum(opened) == len(PROMPTS) and min(opened) >= 1, opened  # leastconn spread them, none was lost
    assert all(r[0].stats.reopened == 0 and r[0].stats.reconnects == 0 for r in results)


def test_rolling_restart_fails_no_client(cluster, tiny_bundle, references):
    old = cluster.replicas(2)
    assert old is not None
    mark = len(cluster.lines)
    restarted = threading.Event()

    def watch() -> None:
        try:
            cluster.wait_for(lambda: cluster.replicas(2, after=mark) is not None, 120)
        finally:
            restarted.set()  # also on a timeout: the clients stop, the assertions below fail

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    cluster.proc.send_signal(signal.SIGHUP)
    # The clients keep their connections and generate until both replicas were drained and restarted, so the
    # drained replica had live connections: their sessions must carry on elsewhere.
    results = asyncio.run(_generate(cluster.url, tiny_bundle, until=restarted))
    watcher.join(5)
    new = cluster.replicas(2, after=mark)
    assert new is not None and all(n[0] != o[0] for n, o in zip(new, old, strict=True))  # both replaced
    assert all(_gone(pid) for pid, _ in old)
    _assert_identical(results, references)
    moved = sum(r.stats.reconnects + r.stats.refused for per in results for r in per)
    assert moved >= 1  # some session was on a replica that drained, and carried on elsewhere


def test_killed_replica_loses_nothing(cluster, tiny_bundle, references):
    replicas = cluster.replicas(2)  # the latest lines: the replicas the rolling restart started
    assert replicas is not None
    victim = replicas[0][0]
    seen = [0] * len(PROMPTS)

    def on_delta(i: int) -> None:
        seen[i] += 1
        if seen[i] == 3 and sum(1 for s in seen if s >= 3) == len(PROMPTS) // 2 and not _gone(victim):
            os.kill(victim, signal.SIGKILL)  # mid-generation: half the clients have tokens, none is done

    results = asyncio.run(_generate(cluster.url, tiny_bundle, on_delta=on_delta))
    assert _gone(victim)
    _assert_identical(results, references)
    assert sum(r[0].stats.reopened for r in results) >= 1  # its sessions were rebuilt on the other replica


def test_sigterm_stops_everything(cluster):
    pids = [pid for pid, _ in cluster.replicas(2, after=0) or []]
    cluster.proc.send_signal(signal.SIGTERM)
    assert cluster.proc.wait(40) == 0
    assert all(_gone(pid) for pid in pids)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", cluster.port), timeout=2).close()
