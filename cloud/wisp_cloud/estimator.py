"""Verification-time estimator: predicts the wall time of one batched forward pass on the running backend.

The scheduler asks it "how long would this batch take?" many times per batch it builds, and `wisp simulate`
uses it as the GPU's clock, so prediction is pure Python over a handful of aggregates (no numpy, no torch).
Fitting uses numpy, imported lazily.

Model: a non-negative linear combination of batch features (docs/scheduling.md):

    t(batch) = Σ_f  w_f · x_f(batch)        w_f ≥ 0

with features computed from the batch's item shapes (new tokens n_i, cached context c_i, cache-miss flag):
batch size B, Σn, Σc, max c, misses, the attention work Σ n_i·(c_i + n_i) and the padded area
B·max(n)·max(n + c) that a padded ragged batch really computes. The fit minimises *relative* squared error
(weights 1/t), which is what MAPE measures, and drops features whose weight would go negative (active set);
IRLS with Huber weights on the relative residuals keeps a few badly timed points from bending the fit.

Online refinement: `observe()` feeds every batch the server actually ran. A multiplicative correction (an
exponentially weighted mean of log(observed/predicted)) reacts at once; every `refit_every` observations the
weights are refit on the profile data plus a window of recent batches (weighted up), and the correction resets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "wisp.estimator.v1"


# Items of one size whose contexts differ by less than this may share a predicted time (the scheduler's and the
# wait hints' memos): 32 tokens of context move a 7B or 32B prediction by well under 0.1 %.
CONTEXT_BUCKET = 32


@dataclass(frozen=True)
class ItemShape:
    """One work item's shape. `context` is the cached prefix it attends to; a cache miss rebuilds it."""

    new_tokens: int
    context: int = 0
    cache_miss: bool = False

    def bucket(self) -> tuple[int, int, bool]:
        """The key under which items share a memoized prediction (`CONTEXT_BUCKET`)."""
        return self.new_tokens, self.context // CONTEXT_BUCKET, self.cache_miss


@dataclass(slots=True)
class BatchShape:
    """Aggregates of a batch that the features need; `plus` adds one item cheaply.

    `items` keeps every item's effective (new, context), sorted, so that a backend that splits a batch into
    padded groups (see `GroupRule`) can be modelled group by group; it is None for a shape rebuilt from
    `BatchStats`, which carries sums only (then the batch is taken as one padded group of its mean shape).
    Treat it as immutable: `plus` returns a new shape.
    """

    batch_size: int = 0
    new_tokens: int = 0
    context_tokens: int = 0
    max_context: int = 0
    cache_misses: int = 0
    max_new: int = 0
    max_total: int = 0  # max over items of context + new (the padded key length)
    attn: int = 0  # Σ n_i·(c_i + n_i): query×key pairs of the attention
    items: tuple[tuple[int, int], ...] | None = ()
    # Items added by `plus` and not yet merged into `items`, as a shared linked list ((n, c), rest): `plus` stays
    # O(1) (the scheduler grows a batch item by item), and only a padded-group rule ever needs them sorted.
    added: tuple | None = field(default=None, repr=False, compare=False)

    def sorted_items(self) -> tuple[tuple[int, int], ...] | None:
        """Every item's effective (new, context), sorted; None for a shape that carries sums only."""
        if self.items is None or self.added is None:
            return self.items
        more = []
        node = self.added
        while node is not None:
            more.append(node[0])
            node = node[1]
        self.items, self.added = tuple(sorted([*self.items, *more])), None
        return self.items

    def plus(self, item: ItemShape) -> BatchShape:
        n, c = item.new_tokens, item.context
        if item.cache_miss:  # the cached prefix is recomputed: it is new work, not cached context
            n, c = n + c, 0
        items = self.items
        return BatchShape(
            batch_size=self.batch_size + 1,
            new_tokens=self.new_tokens + n,
            context_tokens=self.context_tokens + c,
            max_context=max(self.max_context, c),
            cache_misses=self.cache_misses + (1 if item.cache_miss else 0),
            max_new=max(self.max_new, n),
            max_total=max(self.max_total, n + c),
            attn=self.attn + n * (c + n),
            items=items,
            added=None if items is None else ((n, c), self.added),
        )

    @classmethod
    def of(cls, items: Iterable[ItemShape]) -> BatchShape:
        """The shape of a whole batch at once (the same as adding its items one by one with `plus`)."""
        b = new = ctx = max_ctx = misses = max_new = max_total = attn = 0
        pairs = []
        for item in items:
            n, c = item.new_tokens, item.context
            if item.cache_miss:
                n, c = n + c, 0
                misses += 1
            b += 1
            new += n
            ctx += c
            max_ctx = max(max_ctx, c)
            max_new = max(max_new, n)
            max_total = max(max_total, n + c)
            attn += n * (c + n)
            pairs.append((n, c))
        pairs.sort()
        return cls(b, new, ctx, max_ctx, misses, max_new, max_total, attn, items=tuple(pairs))

    @classmethod
    def uniform(cls, items: int, tokens: int, context: int) -> BatchShape:
        """`of([ItemShape(tokens, context)] * items)` without the per-item loop (the regime asks it for up to
        thousands of items, many times per decision)."""
        return cls(
            batch_size=items,
            new_tokens=items * tokens,
            context_tokens=items * context,
            max_context=context,
            max_new=tokens,
            max_total=tokens + context,
            attn=items * tokens * (context + tokens),
            items=((tokens, context),) * items,
        )

    @classmethod
    def from_stats(cls, stats: Any) -> BatchShape:
        """Approximate shape from a `BatchStats` (which carries sums, not per-item shapes)."""
        b = max(int(stats.batch_size), 1)
        n, c = int(stats.new_tokens), int(stats.context_tokens)
        mean_n = n / b
        return cls(
            batch_size=int(stats.batch_size),
            new_tokens=n,
            context_tokens=c,
            max_context=int(stats.max_context),
            cache_misses=int(stats.cache_misses),
            max_new=math.ceil(mean_n),
            max_total=int(stats.max_context) + math.ceil(mean_n),
            attn=round(mean_n * c + n * mean_n),
            items=None,
        )


@dataclass(frozen=True)
class GroupRule:
    """How a padded backend splits a batch (items ascending by new tokens; a group is cut when its padded rows
    would exceed `pad_factor` × its real rows + `pad_slack`). Mirrors NativeBackend._groups."""

    pad_factor: float = 1.5
    pad_slack: int = 32

    def groups(self, shape: BatchShape) -> list[tuple[int, int, int]]:
        """[(items, max new, max context)] per padded group."""
        items = shape.sorted_items()
        if items is None:
            return [(shape.batch_size, shape.max_new, shape.max_context)] if shape.batch_size else []
        out = []
        cnt = real = gmax_c = 0
        gmax_n = 0
        for n, c in items:
            if cnt and (cnt + 1) * n > self.pad_factor * (real + n) + self.pad_slack:
                out.append((cnt, gmax_n, gmax_c))
                cnt = real = gmax_c = 0
            cnt += 1
            real += n
            gmax_n = n
            gmax_c = max(gmax_c, c)
        if cnt:
            out.append((cnt, gmax_n, gmax_c))
        return out


FEATURES = (
    "groups",
    "pad_rows",
    "pad_past",
    "pad_attn",
    "batch",
    "new",
    "ctx",
    "max_ctx",
    "miss",
    "attn",
    "pad_verify",
    "new_over",
)
DEFAULT_FEATURES = ("groups", "batch", "new", "ctx", "miss", "attn", "pad_rows", "pad_past", "pad_attn")
# A varlen (paged) engine packs new tokens without padding and each sequence's attention reads its own pages:
# per step a weight read (`groups`, 1), per sequence (`batch`), per new token (`new`), per cached token read
# (`ctx`), per query×key pair (`attn`), per cache miss. Its attention runs one of two kernels for the whole batch:
# one query row per sequence when every item is a one-token decode, query tiles otherwise (a verify or a prompt
# piece anywhere in the batch). The tiled kernel's grid is sized by the longest context: it pays per sequence
# and per token of that context (`pad_verify` = B × max context, 0 for a decode-only batch). Measured on an H200
# (`wisp profile --grid full`, run 24): one price for both kernels left decodes 10-20 % over and verifies
# 15-40 % under, held-out MAPE 11.3 % (32B) and 10.9 % (7B), against 7.3 % and 6.6 % with `pad_verify` (a
# per-cached-token price for the tiled kernel as well fitted to 0; docs/benchmarks.md). And a step is
# memory-bound (the weight read) up to a few hundred new tokens and compute-bound past them (the roofline): each
# token past the knee costs more (`new_over` = max(0, Σn − knee), the knee fitted from `KNEES`). Without it, steps
# of 1-2k tokens came out 25-30 % under and small ones 20 % over; with it held-out MAPE fell to 5.4-6.4 %
# (full grid, 7B and 32B, two seeds). The padded features would equal new/ctx/attn on every homogeneous grid
# point, so only the few ragged mixes would decide the split between them: noise, not cost.
VARLEN_FEATURES = ("groups", "batch", "new", "ctx", "miss", "attn", "pad_verify", "new_over")
# candidate knees (new tokens per step); `fit` keeps the one that explains its training batches best
KNEES = (64, 128, 256, 512, 1024)


def all_features(shape: BatchShape, rule: GroupRule | None, knee: int) -> tuple[int, ...]:
    """Every feature of `FEATURES`, in that order (one pass; this is the scheduler's hot path)."""
    g = rows = past = area = 0
    b, c = shape.batch_size, shape.context_tokens
    if rule is None or shape.items is None:  # one padded group: no list to build
        n, mc = shape.max_new, shape.max_context
        if b:
            g, rows, past, area = 1, b * n, b * mc, b * n * (mc + n)
    else:
        for gb, n, gc in rule.groups(shape):
            g += 1
            rows += gb * n
            past += gb * gc
            area += gb * n * (gc + n)
    tiled = shape.max_new > 1  # the attention kernel of the whole batch (see VARLEN_FEATURES)
    return (
        g,
        rows,
        past,
        area,
        b,
        shape.new_tokens,
        c,
        shape.max_context,
        shape.cache_misses,
        shape.attn,
        b * shape.max_context if tiled else 0,
        max(0, shape.new_tokens - knee),
    )


@dataclass
class Observation:
    shape: BatchShape
    seconds: float


def _as_observation(x: Any) -> Observation:
    if isinstance(x, Observation):
        return x
    if isinstance(x, tuple) and len(x) == 2:
        shape, secs = x
        if not isinstance(shape, BatchShape):
            shape = BatchShape.of(shape)
        return Observation(shape, float(secs))
    return Observation(BatchShape.from_stats(x), float(x.forward_s))


def _fit_nonneg(rows: Any, ys: Any, weights: Any) -> list[float]:
    """Weighted least squares with w ≥ 0: drop the most negative weight and refit until none is negative."""
    import numpy as np

    x = np.asarray(rows, dtype=np.float64)
    y = np.asarray(ys, dtype=np.float64)
    sw = np.sqrt(np.asarray(weights, dtype=np.float64))
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    xs = x / scale * sw[:, None]
    yw = y * sw
    active = [j for j in range(x.shape[1]) if np.any(x[:, j] != 0)]
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(xs[:, active], yw, rcond=None)
        if np.all(sol >= 0):
            coef[:] = 0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return (coef / scale).tolist()


HUBER_K = 1.345  # Huber's tuning constant: 95 % efficiency when the errors are Gaussian


def _fit_robust(
    rows: list[list[float]], ys: list[float], weights: list[float], iters: int = 12
) -> list[float]:
    """`_fit_nonneg` made robust by IRLS with Huber weights on the *relative* residuals.

    A grid point timed while another tenant held the CPU (or a CUDA graph was captured) is off by tens of
    percent; least squares bends every weight towards it. Here each point's weight is cut to k·s/|r| once its
    relative residual r exceeds k·s, s being the residuals' robust scale (1.4826·median |r|).
    """
    import numpy as np

    x = np.asarray(rows, dtype=np.float64)
    y = np.asarray(ys, dtype=np.float64)
    base = np.asarray(weights, dtype=np.float64)
    h = np.ones_like(y)
    coef = np.asarray(_fit_nonneg(x, y, base))
    for _ in range(iters):
        r = (x @ coef - y) / y
        scale = max(1.4826 * float(np.median(np.abs(r))), 1e-4)
        new_h = np.minimum(1.0, HUBER_K * scale / np.maximum(np.abs(r), 1e-12))
        if np.max(np.abs(new_h - h)) < 1e-3:
            break
        h = new_h
        coef = np.asarray(_fit_nonneg(x, y, base * h))
    return [float(c) for c in coef]


def _row(o: Observation) -> dict[str, Any]:
    """An observation as the estimator file stores it: the item shapes when known, else the aggregates."""
    sh = o.shape
    items = sh.sorted_items()
    if items is not None:
        return {"items": [list(it) for it in items], "miss": sh.cache_misses, "s": o.seconds}
    agg = [sh.batch_size, sh.new_tokens, sh.context_tokens, sh.max_context, sh.cache_misses]
    return {"agg": agg + [sh.max_new, sh.max_total, sh.attn], "s": o.seconds}


def _unrow(r: dict[str, Any]) -> Observation:
    if "items" in r:
        shape = BatchShape.of(ItemShape(int(n), int(c)) for n, c in r["items"])
        shape = dataclasses.replace(shape, cache_misses=int(r.get("miss", 0)))
    else:
        b, n, c, mc, miss, mn, mt, attn = (int(x) for x in r["agg"])
        shape = BatchShape(b, n, c, mc, miss, mn, mt, attn, items=None)
    return Observation(shape, float(r["s"]))


def mape(pred: Sequence[float], actual: Sequence[float]) -> float:
    """Mean absolute percentage error, in percent."""
    if not actual:
        return float("nan")
    return 100.0 * sum(abs(p - a) / a for p, a in zip(pred, actual, strict=True)) / len(actual)


@dataclass
class VerifyTimeEstimator:
    """Predicts a batch's forward time in seconds. Fit from profiles, refined online, saved as JSON."""

    features: tuple[str, ...] = DEFAULT_FEATURES
    coef: list[float] = field(default_factory=list)
    group_rule: GroupRule | None = None  # the backend's padded grouping (None: one padded group)
    meta: dict[str, Any] = field(default_factory=dict)
    robust: bool = True  # Huber IRLS (`_fit_robust`); False: plain least squares
    knee: int | None = None  # `new_over`'s knee in new tokens; None: the next `fit` picks it from KNEES
    window: int = 512
    refit_every: int = 64
    online_weight: float = 4.0
    ewma: float = 0.05
    _base: list[Observation] = field(default_factory=list, repr=False)
    _recent: deque = field(default_factory=deque, repr=False)
    _log_corr: float = field(default=0.0, repr=False)
    _since_refit: int = field(default=0, repr=False)
    version: int = field(default=0, repr=False)  # bumped whenever the weights change (a cache key)
    refits: int = field(default=0, repr=False)  # online refits so far (`observe`)
    _corr: float = field(default=1.0, repr=False)
    # `wisp profile`'s held-out timings, kept in the file so that a fit can be re-scored offline; never fitted on
    heldout: list[Observation] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            raise ValueError(f"unknown estimator features {unknown}; known: {sorted(FEATURES)}")
        self.features = tuple(self.features)
        if not self.coef:
            self.coef = [0.0] * len(self.features)
        self._recent = deque(self._recent, maxlen=self.window)
        self._index = [FEATURES.index(f) for f in self.features]
        self._synced: list[float] | None = None
        self._knee = self.knee if self.knee is not None else KNEES[2]

    def _sync(self) -> list[float]:
        """Coefficients aligned with `FEATURES` (zeros for unused ones), for the hot-path dot product."""
        full = [0.0] * len(FEATURES)
        for j, w in zip(self._index, self.coef, strict=True):
            full[j] = float(w)
        self._full = full
        self._synced = self.coef
        self.version += 1
        return full

    # ---- construction ----
    @classmethod
    def default(cls) -> VerifyTimeEstimator:
        """A rough prior for when nothing was profiled yet: 5 ms per pass, 0.2 ms per token, attention 2 µs/pair."""
        est = cls()
        prior = {"groups": 5e-3, "batch": 2e-4, "new": 2e-4, "attn": 2e-6, "miss": 1e-3}
        est.coef = [prior.get(f, 0.0) for f in est.features]
        est.meta["source"] = "default prior"
        return est

    @classmethod
    def fitted(
        cls,
        data: Iterable[Any],
        features: Sequence[str] = DEFAULT_FEATURES,
        group_rule: GroupRule | None = None,
        robust: bool = True,
    ) -> VerifyTimeEstimator:
        est = cls(features=tuple(features), group_rule=group_rule, robust=robust)
        est.fit(data)
        return est

    # ---- features and prediction ----
    def featurize(self, shape: BatchShape) -> list[float]:
        x = all_features(shape, self.group_rule, self._knee)
        return [float(x[j]) for j in self._index]

    @property
    def correction(self) -> float:
        return self._corr

    def predict_raw(self, shape: BatchShape) -> float:
        """Prediction of the fitted weights alone, without the online correction factor."""
        if shape.batch_size == 0:
            return 0.0
        w = self._full if self._synced is self.coef else self._sync()
        x = all_features(shape, self.group_rule, self._knee)
        return (
            w[0] * x[0]
            + w[1] * x[1]
            + w[2] * x[2]
            + w[3] * x[3]
            + w[4] * x[4]
            + w[5] * x[5]
            + w[6] * x[6]
            + w[7] * x[7]
            + w[8] * x[8]
            + w[9] * x[9]
            + w[10] * x[10]
            + w[11] * x[11]
        )

    def predict_shape(self, shape: BatchShape) -> float:
        return self.predict_raw(shape) * self._corr

    def predict(self, items: Iterable[ItemShape] | BatchShape) -> float:
        """Predicted seconds for a batch of item shapes (0 for an empty batch)."""
        shape = items if isinstance(items, BatchShape) else BatchShape.of(items)
        return self.predict_shape(shape)

    def predict_marginal(self, batch: Iterable[ItemShape] | BatchShape, item: ItemShape) -> float:
        """Extra seconds that adding `item` to `batch` costs (its solo time when the batch is empty)."""
        shape = batch if isinstance(batch, BatchShape) else BatchShape.of(batch)
        return self.predict_shape(shape.plus(item)) - self.predict_shape(shape)

    # ---- fitting ----
    def fit(self, data: Iterable[Any]) -> VerifyTimeEstimator:
        """Fit on profiled batches: `BatchStats`, `Observation`s, or `(items|BatchShape, seconds)` pairs."""
        obs = [o for o in map(_as_observation, data) if o.seconds > 0 and o.shape.batch_size > 0]
        if not obs:
            raise ValueError("no observations to fit the estimator on")
        self._base = obs
        self._recent.clear()
        if "new_over" in self.features and self.knee is None:
            self.knee = min(KNEES, key=self._training_error)  # the roofline's knee (training error only)
        self._knee = self.knee if self.knee is not None else KNEES[2]
        self._refit()
        return self

    def _training_error(self, knee: int) -> float:
        """MAPE on the profile of a fit with this knee (`fit` chooses the knee by it)."""
        self._knee = knee
        self._refit()
        return self.evaluate(self._base)

    def _refit(self) -> None:
        rows, ys, ws = [], [], []
        for o in self._base:
            rows.append(self.featurize(o.shape))
            ys.append(o.seconds)
            ws.append(1.0 / o.seconds**2)
        for o in self._recent:
            rows.append(self.featurize(o.shape))
            ys.append(o.seconds)
            ws.append(self.online_weight / o.seconds**2)
        self.coef = (_fit_robust if self.robust else _fit_nonneg)(rows, ys, ws)
        self._log_corr = 0.0
        self._corr = 1.0
        self._since_refit = 0
        self.refits += 1

    def observe(self, stats: Any, items: Iterable[ItemShape] | None = None) -> None:
        """Refine online from a batch that ran: its `BatchStats` (and, better, its exact item shapes)."""
        secs = float(stats.forward_s) if not isinstance(stats, (int, float)) else float(stats)
        if secs <= 0:
            return
        shape = BatchShape.of(items) if items is not None else BatchShape.from_stats(stats)
        if shape.batch_size == 0:
            return
        pred = self.predict_shape(shape)
        if pred > 0:
            err = math.log(secs / pred)
            self._log_corr += self.ewma * max(-1.0, min(1.0, err))
            self._corr = math.exp(self._log_corr)
        self._recent.append(Observation(shape, secs))
        self._since_refit += 1
        if self._since_refit >= self.refit_every and len(self._base) + len(self._recent) >= 2 * len(
            self.coef
        ):
            self._refit()

    def evaluate(self, data: Iterable[Any]) -> float:
        """MAPE (%) of this estimator on observations."""
        obs = [_as_observation(o) for o in data]
        return mape([self.predict_shape(o.shape) for o in obs], [o.seconds for o in obs])

    # ---- persistence ----
    def to_dict(self) -> dict[str, Any]:
        rule = self.group_rule
        return {
            "format": FORMAT,
            "features": list(self.features),
            "coef": list(self.coef),
            "group_rule": None
            if rule is None
            else {"pad_factor": rule.pad_factor, "pad_slack": rule.pad_slack},
            "fit": "huber" if self.robust else "lsq",
            "knee": self.knee,
            "meta": self.meta,
            "profile": [_row(o) for o in self._base],
            "heldout": [_row(o) for o in self.heldout],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VerifyTimeEstimator:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a WISP estimator file (format {d.get('format')!r}, expected {FORMAT!r})")
        rule = d.get("group_rule")
        est = cls(
            features=tuple(d["features"]),
            coef=[float(c) for c in d["coef"]],
            group_rule=None if rule is None else GroupRule(float(rule["pad_factor"]), int(rule["pad_slack"])),
            meta=dict(d.get("meta", {})),
            robust=d.get("fit", "huber") != "lsq",
            knee=d.get("knee"),
        )
        if len(est.coef) != len(est.features):
            raise ValueError("estimator file has a different number of coefficients and features")
        est._base = [_unrow(r) for r in d.get("profile", [])]
        est.heldout = [_unrow(r) for r in d.get("heldout", [])]
        return est

    def save(self, path: str | Path) -> None:
        self.meta.setdefault("saved_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> VerifyTimeEstimator:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            from wisp_sdk.errors import WispError

            raise WispError(f"cannot read estimator file {path}: {exc}") from exc
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            from wisp_sdk.errors import WispError

            raise WispError(f"bad estimator file {path}: {exc}") from exc
