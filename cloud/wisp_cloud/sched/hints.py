"""Wait hints: the verdict's prediction of how long a session's next round will take at the server."""

from __future__ import annotations

from collections.abc import Iterable

from wisp_cloud.estimator import BatchShape, ItemShape, VerifyTimeEstimator

_EMPTY = BatchShape()


class WaitHints:
    """The verdict's `wait_hint_ms`: how long the session's next round is predicted to take at the server.

    hint = max(rest of the running batch, EWMA of verify queue waits) + predicted time of the last batch's
    shape with this item added. Usable on its own by a server that keeps its own queue.
    """

    def __init__(self, estimator: VerifyTimeEstimator, ewma: float = 0.1) -> None:
        self.estimator = estimator
        self.ewma = ewma
        self.queue_s = 0.0
        self.last_shape = _EMPTY
        self.busy_until = 0.0
        self._memo: dict[tuple[int, int, bool], float] = {}
        # the estimator's (version, correction) that the memo was made with
        self._memo_key: tuple[int, float] = (-1, 0.0)

    def started(self, predicted_s: float, now: float) -> None:
        self.busy_until = now + predicted_s

    def finished(self, shapes: Iterable[ItemShape], now: float) -> None:
        self.last_shape = BatchShape.of(shapes)
        self.busy_until = now
        self._memo.clear()

    def launch_in(self, now: float) -> float:
        """Seconds until the running step is predicted to end, when the next one launches: a verdict's
        `launch_in_ms` (0 when no step runs: a round joins whenever it arrives)."""
        return max(0.0, self.busy_until - now)

    def queued(self, queue_s: float) -> None:
        """A verify/decode request waited `queue_s` from arrival to its batch."""
        self.queue_s += self.ewma * (queue_s - self.queue_s)

    def hint(self, item: ItemShape, now: float) -> float:
        busy = max(0.0, self.busy_until - now)
        return max(busy, self.queue_s) + self._step_with(item)

    def _step_with(self, item: ItemShape) -> float:
        """Predicted time of the last batch's shape with `item` added, memoized per step and context bucket: every
        verdict asks up to three hints (its own, the hybrid's round and decode), each a full prediction before
        (host_path.py, 256 sessions: the hybrid's check alone cost ≈ 35 µs a round under cProfile)."""
        est = self.estimator
        stamp = (est.version, est.correction)
        if stamp != self._memo_key:
            self._memo.clear()
            self._memo_key = stamp
        key = item.bucket()
        t = self._memo.get(key)
        if t is None:
            t = self._memo[key] = est.predict_shape(self.last_shape.plus(item))
        return t
