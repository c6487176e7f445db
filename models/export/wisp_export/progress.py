"""Progress display on stderr, so that stdout stays clean for results (e.g. the path `wisp models fetch` prints)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm


def bar(total: int | None = None, desc: str = "", unit: str = "it", **kwargs) -> tqdm:
    """A tqdm bar on stderr; bytes get scaled units."""
    scale = unit == "B"
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=scale,
        unit_divisor=1024 if scale else 1000,
        file=sys.stderr,
        **kwargs,
    )


@contextmanager
def phase(desc: str) -> Iterator[None]:
    """A live elapsed-time ticker for steps that give no progress of their own (ONNX export, quantization).

    A spinner with honest elapsed time beats a fake percentage; the final line keeps the duration.
    """
    ticker = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}", file=sys.stderr)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1.0):
            ticker.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    start = time.monotonic()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        thread.join()
        # close() draws the bar one last time, with the final duration.
        ticker.bar_format = (
            "{desc}: " + ("done in " if ok else "failed after ") + f"{time.monotonic() - start:.1f} s"
        )
        ticker.close()
