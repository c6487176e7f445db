"""Per-step statistics of the engine: running totals (for benchmarks) and the periodic `steps` log line."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from wisp_cloud.backends.base import BatchStats
from wisp_cloud.logs import log_event


@dataclass
class StepTotals:
    """Running sums over every batch step since start: what the host-path benchmark reads (bench/host_path.py)."""

    steps: int = 0
    items: int = 0  # work items over all steps (a session counts once per step it is in)
    forward_s: float = 0.0  # time inside backend.forward
    step_s: float = 0.0  # whole step: selection, planning, forward, acceptance, answers
    # the two host phases on the device's critical path (within step_s − forward_s): the policy's selection and
    # planning of the step, and the commit of its outcomes (tokens, verdicts, the hybrid's and regime's checks)
    schedule_s: float = 0.0
    commit_s: float = 0.0

    def add(self, items: int, forward_s: float, step_s: float, schedule_s: float, commit_s: float) -> None:
        self.steps += 1
        self.items += items
        self.forward_s += forward_s
        self.step_s += step_s
        self.schedule_s += schedule_s
        self.commit_s += commit_s


@dataclass(slots=True)
class StepMix:
    """What one step carried, by the scheduler's request kinds, and what its selection left in the queue."""

    rounds: int = 0
    decodes: int = 0
    prefills: int = 0  # prompt pieces: an Open's prompt or chunk, or a context rebuilt after an eviction
    left: int = 0  # requests the selection left waiting

    @property
    def items(self) -> int:
        return self.rounds + self.decodes + self.prefills

    @classmethod
    def of(cls, kinds: Iterable[str], left: int) -> StepMix:
        n = Counter(kinds)
        return cls(n["verify"], n["decode"], n["prefill"], left)


class StepLog:
    """Every `every_s`: one `steps` line (batch sizes, forward and whole-step times, busy share, graph cache)."""

    def __init__(
        self, log: logging.Logger, graph_stats: Callable[[], object] | None = None, every_s: float = 10.0
    ) -> None:
        self.log = log
        self.graph_stats = graph_stats
        self.every_s = every_s
        self.totals = StepTotals()
        # (batch, tokens, forward_s, step_s, schedule_s, commit_s, mix)
        self._window: list[tuple[int, int, float, float, float, float, StepMix]] = []
        self._since = time.monotonic()

    def add(self, stats: BatchStats, mix: StepMix, step_s: float, schedule_s: float, commit_s: float) -> None:
        self.totals.add(mix.items, stats.forward_s, step_s, schedule_s, commit_s)
        self._window.append(
            (stats.batch_size, stats.new_tokens, stats.forward_s, step_s, schedule_s, commit_s, mix)
        )
        now = time.monotonic()
        if now - self._since >= self.every_s:
            self._flush(now)

    def _flush(self, now: float) -> None:
        elapsed = now - self._since
        steps, self._window, self._since = self._window, [], now

        def pct(xs: list[float], q: float) -> float:
            xs = sorted(xs)
            return 1000.0 * xs[min(len(xs) - 1, int(q * len(xs)))]

        fwd = [x[2] for x in steps]
        whole = [x[3] for x in steps]
        mixes = [x[6] for x in steps]

        def mean(xs: Iterable[int]) -> float:
            return round(sum(xs) / len(steps), 1)

        graphs = self.graph_stats() if self.graph_stats is not None else None
        log_event(
            self.log,
            "steps",
            n=len(steps),
            batch_mean=round(sum(x[0] for x in steps) / len(steps), 1),
            tokens_mean=round(sum(x[1] for x in steps) / len(steps), 1),
            forward_ms_p50=pct(fwd, 0.5),
            forward_ms_p90=pct(fwd, 0.9),
            step_ms_p50=pct(whole, 0.5),
            step_ms_p90=pct(whole, 0.9),
            # the device's wait for the host before each forward (whole step = host + forward)
            host_ms_p50=pct([w - f for w, f in zip(whole, fwd, strict=True)], 0.5),
            # its two measured phases, per step (the rest: KV changes, housekeeping, the event loop)
            schedule_ms_p50=pct([x[4] for x in steps], 0.5),
            commit_ms_p50=pct([x[5] for x in steps], 0.5),
            # the step's mix, so that host time can be put down to the kinds of items (per step, means)
            rounds_mean=mean(m.rounds for m in mixes),
            decodes_mean=mean(m.decodes for m in mixes),
            prefills_mean=mean(m.prefills for m in mixes),
            left_waiting_mean=mean(m.left for m in mixes),
            step_over_forward=round(sum(whole) / max(sum(fwd), 1e-9), 3),
            busy=round(sum(whole) / elapsed, 2),  # fraction of the time the batch loop was working
            **({"graphs": dict(graphs)} if graphs else {}),  # type: ignore[call-overload]
        )
