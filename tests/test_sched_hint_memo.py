"""The wait hints and the WISP policy share predicted times between items of one size whose contexts differ by
less than `CONTEXT_BUCKET` tokens (host work per verdict, docs/benchmarks.md "GPU runs 27-31"): the shared value
must stay within that bucket's error of a fresh prediction and must not outlive a step or a refit."""

from __future__ import annotations

from wisp_cloud.estimator import CONTEXT_BUCKET, ItemShape, VerifyTimeEstimator
from wisp_cloud.sched.hints import WaitHints


def _est() -> VerifyTimeEstimator:
    est = VerifyTimeEstimator.default()
    est.predict([ItemShape(1)])  # its first prediction syncs the weights (and bumps `version` once)
    return est


def test_hint_matches_a_fresh_prediction_within_its_context_bucket() -> None:
    est = _est()
    hints = WaitHints(est)
    hints.finished([ItemShape(4, 500)] * 64, now=0.0)
    for ctx in (500, 500 + CONTEXT_BUCKET - 1, 2000):
        fresh = est.predict_shape(hints.last_shape.plus(ItemShape(4, ctx)))
        memo = hints.hint(ItemShape(4, ctx), now=0.0)  # busy 0, queue 0: the prediction alone
        assert abs(memo - fresh) <= 0.001 * fresh


def test_hint_memo_is_dropped_after_a_step_and_a_refit() -> None:
    est = _est()
    hints = WaitHints(est)
    hints.finished([ItemShape(4, 500)] * 8, now=0.0)
    small = hints.hint(ItemShape(4, 500), now=0.0)
    hints.finished(
        [ItemShape(4, 500)] * 200, now=0.0
    )  # a bigger step ran: the next batch is predicted bigger
    big = hints.hint(ItemShape(4, 500), now=0.0)
    assert big > small
    assert big == est.predict_shape(hints.last_shape.plus(ItemShape(4, 500)))
    est.coef = [2.0 * c for c in est.coef]
    est.version += 1  # as a refit does
    assert abs(hints.hint(ItemShape(4, 500), now=0.0) - 2.0 * big) <= 1e-9 * big
