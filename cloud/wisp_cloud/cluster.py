"""`Cluster`: N `wisp serve` replicas behind one HAProxy, started, restarted and stopped together.

Replicas listen on free loopback ports; with `--device cuda` each gets one visible GPU, or a group of
`--sglang-tp` GPUs (CUDA_VISIBLE_DEVICES, round-robin when there are more replicas than GPUs). `rolling_restart` drains one replica at a time (SIGTERM:
it finishes its rounds in flight and closes with 1001; its clients resume through the balancer, on another
replica, and rebuild their sessions there), starts it again on the same port and waits for `/ready` before the
next one, so clients never see every replica down.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TextIO

from wisp_sdk.errors import WispError

from wisp_cloud.balancer import Balancer, find_haproxy
from wisp_cloud.replica import Replica


def visible_gpus() -> list[str]:
    """The GPU ids replicas may use: CUDA_VISIBLE_DEVICES when set, else what `nvidia-smi -L` lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


class Cluster:
    def __init__(
        self,
        replicas: int,
        serve_args: list[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        device: str = "cpu",
        gpus_per_replica: int = 1,
        haproxy: str = "haproxy",
        drain_s: float = 30.0,
        workdir: Path | None = None,
        log: TextIO | None = None,
    ) -> None:
        if replicas < 1:
            raise WispError("--replicas must be >= 1")
        find_haproxy(haproxy)  # before loading any model: a missing balancer is one clear line
        self.log = log if log is not None else sys.stderr
        self.drain_s = drain_s
        self.abort = threading.Event()  # set by a signal: stop waiting for replicas
        self._tmp = tempfile.TemporaryDirectory(prefix="wisp-cluster-") if workdir is None else None
        self.workdir: Path = Path(self._tmp.name) if self._tmp is not None else Path(workdir or ".")
        envs: list[dict[str, str]] = [{} for _ in range(replicas)]
        if device.startswith("cuda"):
            gpus = visible_gpus()
            if not gpus:
                raise WispError(
                    "--device cuda: no GPU visible (nvidia-smi lists none, or CUDA_VISIBLE_DEVICES is empty)"
                )
            g = gpus_per_replica
            if len(gpus) < g:
                raise WispError(f"each replica needs {g} GPUs (--sglang-tp) but {len(gpus)} are visible")
            groups = [gpus[k : k + g] for k in range(0, len(gpus) - g + 1, g)]  # whole groups only
            envs = [{"CUDA_VISIBLE_DEVICES": ",".join(groups[i % len(groups)])} for i in range(replicas)]
            device = "cuda"  # each replica sees its GPUs from cuda:0
        self.replicas = [
            Replica(
                i,
                [*serve_args, "--trusted-proxy", "127.0.0.1", "--device", device],
                env=envs[i],
                log=self.log,
            )
            for i in range(replicas)
        ]
        self.host = host
        self.port = port
        self.haproxy = haproxy
        self.balancer: Balancer | None = None

    @property
    def url(self) -> str:
        assert self.balancer is not None
        return f"ws://{self.host}:{self.balancer.port}"

    def start(self, timeout_s: float = 600.0) -> None:
        """Start every replica (in parallel), wait for their /ready, then start the balancer in front."""
        waits = [(r, r.launch()) for r in self.replicas]
        for r, listening in waits:
            r.wait_ready(listening, timeout_s, self.abort)
        self.balancer = Balancer(
            self.host,
            self.port,
            [(r.name, r.port) for r in self.replicas],
            binary=self.haproxy,
            config_path=self.workdir / "haproxy.cfg",
            log=self.log,
        )
        self.balancer.start()

    def restart(self, index: int, timeout_s: float = 600.0) -> None:
        """Drain replica `index` (its sessions move on), then start it again on the same port."""
        r = self.replicas[index]
        r.drain()
        r.wait(self.drain_s + 15.0)
        r.wait_ready(r.launch(), timeout_s, self.abort)
        time.sleep(1.0)  # two health checks: the balancer marks it up before the next replica drains

    def rolling_restart(self, timeout_s: float = 600.0) -> None:
        for i in range(len(self.replicas)):
            self.restart(i, timeout_s)

    def stop(self) -> None:
        """Drain every replica at once, wait for them to exit, then stop the balancer."""
        for r in self.replicas:
            r.drain()
        for r in self.replicas:
            r.wait(self.drain_s + 15.0)
        if self.balancer is not None:
            self.balancer.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
