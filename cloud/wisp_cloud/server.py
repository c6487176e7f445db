"""`WispServer`: the gateway and the engine of one verifier, started and stopped together.

    gateway (websocket frames <-> sessions, auth, typed errors)  ->  engine (queue, policy, backend, acceptance)
                                       ^------------------ replies ------------------'

Connections only parse, check and hand work to the engine; the engine's ONE loop takes what the policy selects
from every session's waiting job, runs it as one ragged batch on a worker thread, applies acceptance, and returns
each job's answer for the gateway to send. So sessions share forward passes without sharing any state, and a bad
frame is answered on its own connection without reaching the engine. docs/architecture.md has one round's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from typing import Any

from wisp_sdk.tokenizer import DraftTokenizer

from wisp_cloud.api import EngineCompleter
from wisp_cloud.backends.base import Backend
from wisp_cloud.config import ARM_FLAGS, ServerConfig
from wisp_cloud.engine import Engine
from wisp_cloud.estimator import VerifyTimeEstimator
from wisp_cloud.gateway import Gateway
from wisp_cloud.logs import log_event
from wisp_cloud.sessions import SessionStore
from wisp_cloud.step_stats import StepTotals

# ServerConfig switches an arm of `wisp bench` may override
ARM_OPTIONS = tuple(field for field, _ in ARM_FLAGS.values())

log = logging.getLogger("wisp.server")


class WispServer:
    def __init__(
        self,
        backend: Backend,
        config: ServerConfig,
        estimator: VerifyTimeEstimator | None = None,
        tokenizer: DraftTokenizer | None = None,
        model_name: str = "wisp",
    ) -> None:
        """`tokenizer` (the target's, with its chat template) turns on the OpenAI routes, serving `model_name`."""
        self.cfg = config
        self.engine = Engine(backend, config, estimator)
        self._estimator0 = self.engine.estimator.to_dict()  # what switch_policy starts each arm from
        self._arm_base = {k: getattr(config, k) for k in ARM_OPTIONS}  # and the switches it starts from
        self.gateway = Gateway(self.engine, config)
        if tokenizer is not None:
            auth = bool(config.auth_tokens)
            self.gateway.http.completer = EngineCompleter(self.engine, model_name, tokenizer, auth)
        self.gateway.engine_alive = lambda: self._loop_task is not None and not self._loop_task.done()
        self._loop_task: asyncio.Task | None = None
        self.metrics_port: int | None = None

    # what tests, the CLI and benchmarks read
    @property
    def store(self) -> SessionStore:
        return self.engine.store

    @property
    def estimator(self) -> VerifyTimeEstimator:
        return self.engine.estimator

    @property
    def policy(self):
        return self.engine.policy

    @property
    def totals(self) -> StepTotals:
        return self.engine.steps.totals

    @property
    def port(self) -> int | None:
        return self.gateway.port

    @property
    def url(self) -> str:
        return f"{self.cfg.scheme}://{self.cfg.host}:{self.port}"

    async def start(self, sock: socket.socket | None = None) -> None:
        """`sock`: the serve port, already bound (`wisp serve` binds before loading the model)."""
        await self.gateway.start(sock)
        self._loop_task = asyncio.create_task(self.engine.run(), name="wisp-engine")
        if self.cfg.metrics_port is not None:
            self.metrics_port = self.engine.metrics.serve_http(self.cfg.metrics_port, self.cfg.metrics_host)
        log_event(
            log,
            "server_start",
            url=self.url,
            policy=self.engine.policy.name,
            max_batch=self.cfg.max_batch,
            kv_budget_tokens=self.cfg.kv_budget_tokens,
            max_context_len=self.engine.max_context_len,
            metrics_port=self.metrics_port,
        )

    async def drain(self, grace_s: float) -> None:
        """Graceful stop, first half: stop accepting connections and new sessions (`/ready` says 503, an `Open`
        gets `overloaded`), and let the rounds in flight finish for up to `grace_s`. `stop` then closes every
        connection with 1001 (going away): clients resume on another replica."""
        self.gateway.start_draining()
        end = time.monotonic() + grace_s
        while time.monotonic() < end and self.engine.busy():
            await asyncio.sleep(0.05)
        log_event(log, "drained", busy=self.engine.busy(), sessions=len(self.engine.store))

    async def stop(self) -> None:
        await self.gateway.stop()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        self.engine.close()
        log_event(log, "server_stop", sessions=len(self.engine.store))

    async def switch_policy(
        self, policy: str, idle_timeout_s: float = 60.0, options: dict[str, bool] | None = None
    ) -> None:
        """Benchmarks only (`wisp serve --control-stdin`): serve the next arm with `policy` on the same loaded
        model and captured graphs. Waits up to `idle_timeout_s` for the sessions to end, closes any left, then
        builds a fresh engine (empty queue, metrics and SLO windows) with a fresh copy of the start-up estimator, so
        every arm starts from the same state but the model load and graph capture are paid once. `options`: the
        WISP policy's switches for this arm (ServerConfig fields in ARM_OPTIONS), for ablations."""
        opts = self._arm_options(options or {})  # a bad option fails here, before the old engine is closed
        end = time.monotonic() + idle_timeout_s
        while len(self.engine.store) and time.monotonic() < end:
            await asyncio.sleep(0.1)
        old = self.engine
        for session in list(old.store):
            old.close_session(session)
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        old.close()  # waits for a forward still on the worker thread
        old.release_closed()
        self.cfg = dataclasses.replace(self.cfg, policy=policy, **opts)
        self.engine = Engine(old.backend, self.cfg, VerifyTimeEstimator.from_dict(self._estimator0))
        self.gateway.rebind(self.engine)
        if isinstance(self.gateway.http.completer, EngineCompleter):
            self.gateway.http.completer.engine = self.engine
        self._loop_task = asyncio.create_task(self.engine.run(), name="wisp-engine")
        log_event(
            log, "policy_switch", policy=self.engine.policy.name, previous=old.policy.name, **(options or {})
        )

    def _arm_options(self, options: dict[str, bool]) -> dict[str, Any]:
        """Every arm starts from the start-up switches; an arm's options override them for that arm only."""
        bad = set(options) - set(ARM_OPTIONS)
        if bad:
            raise ValueError(f"unknown arm option(s) {sorted(bad)}: use {', '.join(ARM_OPTIONS)}")
        return {**self._arm_base, **options}

    def stats(self) -> dict:
        """A snapshot for tests and the CLI's --json output."""
        e = self.engine
        return {
            "policy": e.policy.name,
            "sessions": len(e.store),
            "queued": len(e.queue),
            "batch_sizes": dict(e.metrics.batch_size_tally),
            "evictions": e.store.evictions,
            "expired": e.store.expired,
            "kv_tokens": e.store.kv_tokens(),
            "slo": e.slo_summary(time.monotonic()),
            "estimator_correction": e.estimator.correction,
            "policy_counters": dict(e.policy.counters),
            "session_switches": dict(e.committer.switch_counts),
            "switch_reasons": dict(e.committer.switch_reasons),
            "steps": sum(e.metrics.batch_size_tally.values()),
            "batch_mean": _mean_of_tally(e.metrics.batch_size_tally),
            "regime": e.committer.regime.stats() if e.committer.regime is not None else None,
        }


def _mean_of_tally(tally: dict[int, int]) -> float | None:
    n = sum(tally.values())
    return round(sum(k * v for k, v in tally.items()) / n, 2) if n else None


def tune_runtime() -> None:
    """For a serving process, once its long-lived objects exist (model, graphs, server):
    - move them out of the cyclic collector's sight (`gc.freeze`) and collect the young generation less often.
      A full collection scans every object, torch's included: on the dev VM it took 266 ms, eight times in 11 s
      of a 256-session run, each a stall of every session; frozen, none ran (docs/benchmarks.md, "Host path").
      vLLM and SGLang do the same;
    - hand the GIL over within 1 ms, not Python's 5: the step's answers are built on the event loop while the
      worker thread prepares and launches the next forward, which must not wait a whole switch interval."""
    import gc
    import sys

    sys.setswitchinterval(0.001)

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
