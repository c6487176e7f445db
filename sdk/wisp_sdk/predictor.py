"""The rejection predictor: P(the verifier accepts the next draft token), a logistic regression in numpy.

Features, all known on the device the moment a token is drafted:
  top1      the draft's largest (untempered) probability at this position
  entropy   the entropy of that distribution (nats)
  position  the token's index in the current round (log1p), since errors compound along a round
  rate      the session's running acceptance rate, which captures how well draft and target agree on this
            kind of text

`wisp calibrate` fits it on real draft/target traces (greedy agreement per position) and stores the result in
the bundle manifest's `predictor`; without that, `DEFAULT_PREDICTOR` is a hand-set prior that trusts confident
drafts and distrusts flat ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FEATURES = ("top1", "entropy", "log1p_position", "rate")

DEFAULT_PREDICTOR: dict[str, Any] = {
    "kind": "logistic",
    "features": list(FEATURES),
    "weights": [4.5, -0.25, -0.1, 1.5],
    "bias": -2.0,
    "source": "default",
}


def features(top1: float, entropy: float, position: int, rate: float) -> np.ndarray:
    return np.array([top1, entropy, math.log1p(position), rate], dtype=np.float64)


@dataclass
class RejectionPredictor:
    weights: np.ndarray = field(
        default_factory=lambda: np.array(DEFAULT_PREDICTOR["weights"], dtype=np.float64)
    )
    bias: float = DEFAULT_PREDICTOR["bias"]
    meta: dict[str, Any] = field(default_factory=lambda: {"source": "default"})

    def p_accept(self, top1: float, entropy: float, position: int, rate: float) -> float:
        z = float(self.weights @ features(top1, entropy, position, rate)) + self.bias
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.clip(x @ self.weights + self.bias, -30, 30)))

    def update(self, x: np.ndarray, y: float, lr: float) -> None:
        """One online logistic-regression step on one judged token (adapts a prior to the running pair)."""
        err = y - float(self.predict(x[None])[0])
        self.weights = self.weights + lr * err * x
        self.bias += lr * err

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 50) -> RejectionPredictor:
        """Regularized logistic regression by Newton's method (IRLS); the bias is not regularized."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(FEATURES) or len(x) != len(y) or len(y) == 0:
            raise ValueError(f"fit needs x [n, {len(FEATURES)}] and y [n], got {x.shape} and {y.shape}")
        xb = np.hstack([x, np.ones((len(x), 1))])
        w = np.zeros(xb.shape[1])
        reg = np.full(xb.shape[1], l2)
        reg[-1] = 0.0
        for _ in range(iters):
            p = 1.0 / (1.0 + np.exp(-np.clip(xb @ w, -30, 30)))
            grad = xb.T @ (p - y) / len(y) + reg * w
            hess = (xb * (p * (1 - p))[:, None]).T @ xb / len(y) + np.diag(reg) + 1e-9 * np.eye(len(w))
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < 1e-8:
                break
        pred = cls(weights=w[:-1].copy(), bias=float(w[-1]))
        p = pred.predict(x)
        eps = 1e-12
        pred.meta = {
            "source": "calibrated",
            "n_train": int(len(y)),
            "base_rate": float(y.mean()),
            "accuracy": float(((p >= 0.5) == (y >= 0.5)).mean()),
            "log_loss": float(-(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)).mean()),
        }
        return pred

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "logistic",
            "features": list(FEATURES),
            "weights": [float(v) for v in self.weights],
            "bias": float(self.bias),
            **{k: v for k, v in self.meta.items() if k not in {"kind", "features", "weights", "bias"}},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RejectionPredictor:
        data = data or DEFAULT_PREDICTOR
        if data.get("kind", "logistic") != "logistic" or list(data.get("features", FEATURES)) != list(
            FEATURES
        ):
            raise ValueError(
                f"unsupported predictor {data.get('kind')!r} with features {data.get('features')}"
            )
        meta = {k: v for k, v in data.items() if k not in {"kind", "features", "weights", "bias"}}
        return cls(weights=np.array(data["weights"], dtype=np.float64), bias=float(data["bias"]), meta=meta)


def simulate_rounds(
    top1: np.ndarray,
    entropy: np.ndarray,
    agree: np.ndarray,
    max_k: int = 8,
    rate0: float = 0.6,
    ema: float = 0.9,
) -> tuple[np.ndarray, np.ndarray]:
    """Turn one teacher-forced trace into training rows as a drafting session would see them.

    Per position of the target's continuation we know the draft's features and whether its greedy choice agrees
    with the target. Walking the trace in rounds of up to `max_k` drafts, a round ends at the first disagreement
    (positions after it are never verified in real use, so they give no label); the verifier's token then
    starts the next round. That yields realistic `position` and `rate` features.
    """
    rows, labels = [], []
    rate = rate0
    i, n = 0, len(agree)
    while i < n:
        for pos in range(max_k):
            if i + pos >= n:
                i = n
                break
            j = i + pos
            rows.append(features(float(top1[j]), float(entropy[j]), pos, rate))
            ok = bool(agree[j])
            labels.append(1.0 if ok else 0.0)
            rate = ema * rate + (1 - ema) * (1.0 if ok else 0.0)
            if not ok:
                i = j + 1  # the verifier's correction takes position j
                break
        else:
            i += max_k + 1  # all accepted, plus the bonus token
    x = np.array(rows).reshape(-1, len(FEATURES))
    return x, np.array(labels)
