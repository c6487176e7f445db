"""The regime's physics model (sched/regime.py's docstring derives it): N_dec and N_spec, the sessions that server-side
decoding and edge speculation serve on this GPU's estimator. Pure."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from wisp_cloud.deadlines import expected_committed
from wisp_cloud.estimator import BatchShape, ItemShape, VerifyTimeEstimator

WAIT_STEPS = 0.5  # a round waits on average half a step for the running one to end, then rides the next


@dataclass(frozen=True, slots=True)
class SessionSample:
    """One session's measured speculation, as the regime model needs it."""

    alpha: float  # its measured per-token acceptance
    tpot_ms: float  # its TPOT SLO
    context: int  # tokens in its context
    # the draft tokens behind `alpha`, the server's prior left out (decayed counts; 0: only `alpha` is known)
    accepted: float = 0.0
    tried: float = 0.0


@dataclass(frozen=True, slots=True)
class DeviceLine:
    """The fleet's device time per round: `fixed_ms` + `per_token_ms` × k (draft time per token, the rest)."""

    fixed_ms: float
    per_token_ms: float

    def ms(self, k: int) -> float:
        return self.fixed_ms + self.per_token_ms * k


@dataclass(frozen=True, slots=True)
class Capacities:
    decode: int  # sessions that server-side decoding serves at the SLO quantile
    speculative: int  # ... and edge speculation, at its best k
    k: int  # that k
    step_ms: float  # the speculative regime's step period S at that k (0 where it cannot meet the SLO)
    # sessions decoding would serve at the quantile TPOT itself (no margin): the gate on the open sessions
    decode_limit: int = 0


def quantile_of(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(q * len(s))))]


def _largest(ok: Callable[[int], bool], hi: int) -> int:
    """The largest n in [0, hi] with ok(n), for ok monotone (true, then false)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def step_ms(estimator: VerifyTimeEstimator, items: int, tokens: int, context: int, prompt: int = 0) -> float:
    """Predicted ms of a step of `items` items of `tokens` new tokens each at `context`, plus `prompt` prompt
    tokens (one more item, no context)."""
    if items <= 0:
        return 0.0
    shape = BatchShape.uniform(items, tokens, context)
    if prompt > 0:
        shape = shape.plus(ItemShape(prompt, 0))
    return 1000.0 * estimator.predict_shape(shape)


def _fits(
    estimator: VerifyTimeEstimator, share: float, tokens: int, context: int, period: float, prompt: float
) -> Callable[[int], bool]:
    """Does a step of N sessions' rounds (N × share items of `tokens` tokens, and N × `prompt` prompt tokens)
    fit in `period` ms?"""
    return lambda n: (
        step_ms(estimator, max(1, round(n * share)), tokens, context, round(n * prompt)) <= period
    )


def _allowed_step(
    samples: Sequence[SessionSample], e: list[float], think: float, margin: float, quantile: float
) -> float:
    """The longest step at which the `quantile` session, committing `e` tokens a round after `think` ms on its
    device, meets `margin` × its TPOT."""
    return quantile_of(
        [(margin * e_i * s.tpot_ms - think) / (1.0 + WAIT_STEPS) for e_i, s in zip(e, samples, strict=True)],
        quantile,
    )


def capacities(
    estimator: VerifyTimeEstimator,
    samples: Sequence[SessionSample],
    device: DeviceLine,
    quantile: float = 0.1,
    margin: float = 0.9,
    most: int = 2048,
    max_k: int = 8,
    prompt_per_token: float = 0.0,
    fleet_k: float | None = None,
    slack_ms: float = 0.0,
) -> Capacities:
    """N_dec and N_spec of sched/regime.py's docstring, for a fleet like `samples` (non-empty) on devices `device`, with
    `prompt_per_token` prompt tokens per committed token, drafting `fleet_k` tokens a round (None: the best k).
    With `slack_ms`, only a k at which the quantile session meets its TPOT (no margin) at steps of `slack_ms`
    counts."""
    context = round(sum(s.context for s in samples) / len(samples))
    rho = max(0.0, prompt_per_token)
    s_dec = margin * quantile_of([s.tpot_ms for s in samples], quantile)

    def dec_fits(period: float) -> Callable[[int], bool]:
        return lambda n: step_ms(estimator, n, 1, context, round(n * rho)) <= period

    n_dec = _largest(dec_fits(s_dec), most)
    limit = _largest(dec_fits(s_dec / margin), most) if margin < 1.0 else n_dec
    best = Capacities(n_dec, 0, 0, 0.0, limit)
    ks = range(1, max_k + 1) if fleet_k is None else [max(1, round(fleet_k))]
    for k in ks:
        think = device.ms(k)
        e = [expected_committed(k, s.alpha) for s in samples]
        period = _allowed_step(samples, e, think, margin, quantile)
        if period <= 0.0 or (slack_ms > 0.0 and _allowed_step(samples, e, think, 1.0, quantile) < slack_ms):
            continue
        share = period / (think + (1.0 + WAIT_STEPS) * period)  # steps per round a session rides
        committed = share * sum(e) / len(e)
        n = _largest(_fits(estimator, share, k + 1, context, period, rho * committed), most)
        if n > best.speculative:
            best = Capacities(n_dec, n, k, period, limit)
    return best


@dataclass
class LineSums:
    """Decayed least-squares sums of the device line t = a + b·k: weight, Σk, Σk², Σt, Σk·t."""

    w: float = 0.0
    k: float = 0.0
    kk: float = 0.0
    t: float = 0.0
    kt: float = 0.0

    def add(self, k: float, t: float, decay: float) -> None:
        self.w = self.w * decay + 1.0
        self.k = self.k * decay + k
        self.kk = self.kk * decay + k * k
        self.t = self.t * decay + t
        self.kt = self.kt * decay + k * t

    def mean_k(self) -> float | None:
        return self.k / self.w if self.w > 0.0 else None

    def line(self) -> DeviceLine | None:
        """The least-squares line; None where draft lengths hardly vary (fixed-k controllers, a capped fleet),
        since then the intercept cannot be told from the slope."""
        w = self.w
        if w <= 0.0:
            return None
        var = self.kk / w - (self.k / w) ** 2
        if var > 0.25:
            slope = (self.kt / w - (self.k / w) * (self.t / w)) / var
            fixed = self.t / w - slope * self.k / w
            if slope >= 0.0 and fixed >= 0.0:
                return DeviceLine(fixed, slope)
        return None

    def per_token(self) -> DeviceLine:
        """All of the time charged per token: the fleet's own k costs what it costs, longer rounds cost more."""
        return DeviceLine(0.0, self.t / max(self.k, 1e-9)) if self.w > 0.0 else DeviceLine(0.0, 0.0)
