"""The verify price: what one more verified token costs the server's other sessions right now, in GPU ms.

A verify step costs about w + T·f (weight read w, compute f per token). A token added to a step lengthens it by
the estimator's marginal per-token cost f, and every other session in that step (or waiting for the GPU) waits
f longer. So the price of one verified token is

    price_ms = f_ms × others,   others = (sessions in the last batch − 1) + requests waiting

It is 0 on an idle server (an extra token delays nobody), and rises with load: more sessions per step and a
longer queue. Verdicts carry it (`Verdict.price_ms`); the edge's controller drafts a token only while its
expected value covers its draft time plus this price, and the server verifies only the prefix of a draft whose
survival probability pays for it (`verify_len`). Pure: no clock, no torch.
"""

from __future__ import annotations

from wisp_cloud.estimator import BatchShape, ItemShape, VerifyTimeEstimator


class VerifyPrice:
    def __init__(self, estimator: VerifyTimeEstimator) -> None:
        self.estimator = estimator
        self.price_ms = 0.0  # the current price, refreshed once per step (`update`)
        # what one more item costs a step beyond its tokens (per-sequence work, host work the online fit holds),
        # in verified tokens' worth: the hybrid weighs a decoded token's item against a round's (`update`)
        self.item_ratio = 0.0

    def per_token_ms(self, shape: BatchShape) -> float:
        """Marginal ms of one more verified token in a batch of `shape` (at its mean context): a round of 2
        tokens against one of 3. A round has at least 2 (a draft and the target's own), so the step already
        runs the tiled attention kernel; priced from a 1-token item, the price held the switch from the
        decode-only kernel (`pad_verify`: batch × longest context) whenever the last step was all decodes.
        H200 run 38 (7B, 640-720 devices): 5-13 s prices, and sessions moved to server decoding by the hundred."""
        return self._marginals(shape)[0]

    def _marginals(self, shape: BatchShape) -> tuple[float, float]:
        """(ms per token, ms per item beyond its tokens) of joining `shape`, both on the tiled kernel."""
        ctx = shape.context_tokens // shape.batch_size if shape.batch_size else 0
        predict = self.estimator.predict_shape
        base = shape.plus(ItemShape(2, ctx))  # a round in the step: the kernel every item below runs on
        t0 = predict(base)
        two = predict(base.plus(ItemShape(2, ctx))) - t0
        three = predict(base.plus(ItemShape(3, ctx))) - t0
        per_token = max(0.0, three - two)
        return 1000.0 * per_token, 1000.0 * max(0.0, two - 2.0 * per_token)

    def update(self, last_shape: BatchShape, waiting: int) -> float:
        """Refresh the price from the batch that just ran and the queue behind it."""
        others = max(0, last_shape.batch_size - 1) + max(0, waiting)
        per_token, per_item = self._marginals(last_shape)
        self.price_ms = per_token * others if others else 0.0
        self.item_ratio = per_item / per_token if per_token > 0.0 else 0.0
        return self.price_ms


def verify_len(k: int, alpha: float | None, price_ms: float, value_ms: float) -> int:
    """How many of k draft tokens are worth verifying: slot i (1-based) survives with probability alpha^i, and a
    committed token is worth `value_ms` (the session's TPOT budget), so slot i is verified while
    alpha^i × value_ms ≥ price_ms. Survival only falls with i, so the verified slots are a prefix."""
    if alpha is None or price_ms <= 0.0 or k <= 0:
        return k
    m, survive = 0, 1.0
    while m < k:
        survive *= alpha
        if survive * value_ms < price_ms:
            break
        m += 1
    return m
