"""A sampling profiler of the serving process's Python threads, for GPU runs where no profiler can attach.

Every `interval_s` a daemon thread reads every other thread's Python stack (`sys._current_frames`) and counts it,
collapsed as flame-graph tools read it (`thread;outer;...;inner count`, one stack a line). Wall-clock sampling: a
thread that waits for the GIL is counted where it waits, so a phase slowed by another thread's Python shows up as
that phase's samples, and the other thread's stacks at the same time say whose Python it was. Why it exists:
on an H200 (run 52, 7B, Mac mini, ShareGPT) WISP's server-decoded steps cost 1.65x centralized's host time, and
the dev VM's fake-forward bench (`bench/host_path.py`) measured 1.03-1.18x, so the rest had to be seen on the GPU
host. Each sample takes the GIL for the walk (≈ 20-50 µs at a few threads ≈ 30 frames deep): ≈ 1 % at 200 Hz.

`wisp serve --sample-host DIR` runs one and writes a file per arm and point (`bench run` asks for `stats` after
every point); `bench/host_profile.py` compares two files.
"""

from __future__ import annotations

import collections
import gc
import sys
import threading
import time
from pathlib import Path
from types import FrameType

MAX_DEPTH = 48  # innermost frames kept; the loop's and the worker's entry frames are deeper than they matter


def _label(frame: FrameType) -> str:
    code = frame.f_code
    name = getattr(code, "co_qualname", code.co_name)
    return f"{Path(code.co_filename).stem}:{name}"


def collapse(frame: FrameType | None, depth: int = MAX_DEPTH) -> list[str]:
    """A stack as labels, outermost first (at most `depth`, the innermost)."""
    labels: list[str] = []
    while frame is not None and len(labels) < depth:
        labels.append(_label(frame))
        frame = frame.f_back
    labels.reverse()
    return labels


class HostSampler:
    """Counts the stacks of every Python thread but its own, every `interval_s`, until `stop`."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.counts: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self.dumps = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="wisp-sampler")
        # the cyclic collector's runs (a pause of whichever thread allocated, so spread over the stacks above):
        # per generation, how many and their seconds
        self.gc_runs = [0, 0, 0]
        self.gc_s = [0.0, 0.0, 0.0]
        self._gc_t0 = 0.0

    def start(self) -> HostSampler:
        gc.callbacks.append(self._on_gc)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            g = min(int(info.get("generation", 0)), 2)
            self.gc_runs[g] += 1
            self.gc_s[g] += time.perf_counter() - self._gc_t0

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval_s):
            names = {t.ident: t.name for t in threading.enumerate()}
            frames = sys._current_frames()
            stacks = [
                ";".join([names.get(ident, str(ident)), *collapse(frame)])
                for ident, frame in frames.items()
                if ident != me
            ]
            del frames  # frames keep their locals alive
            with self._lock:
                self.counts.update(stacks)
                self.samples += 1

    def take(self) -> tuple[collections.Counter[str], int, float]:
        """The counts since the last `take` (or the start), how many samples they are, and over how many seconds;
        the counting starts again (the collector's tallies too)."""
        now = time.monotonic()
        with self._lock:
            counts, samples, since = self.counts, self.samples, self.started
            self.counts, self.samples, self.started = collections.Counter(), 0, now
        self.gc_runs, self.gc_s = [0, 0, 0], [0.0, 0.0, 0.0]
        return counts, samples, now - since

    def dump(self, directory: Path, label: str) -> Path:
        """Write the counts since the last `take` to `directory`/host-NNN-`label`.txt, numbered in order (collapsed
        stacks, most sampled first, under a header line)."""
        gc_runs, gc_s = self.gc_runs, self.gc_s
        counts, samples, seconds = self.take()
        self.dumps += 1
        path = directory / f"host-{self.dumps:03d}-{label}.txt"
        directory.mkdir(parents=True, exist_ok=True)
        gcs = " ".join(
            f"gc{g}_runs={n} gc{g}_s={t:.3f}" for g, (n, t) in enumerate(zip(gc_runs, gc_s, strict=True))
        )
        lines = [
            f"# label={label} samples={samples} seconds={seconds:.2f} interval_s={self.interval_s} {gcs}"
        ]
        lines += [f"{stack} {n}" for stack, n in counts.most_common()]
        path.write_text("\n".join(lines) + "\n")
        return path
