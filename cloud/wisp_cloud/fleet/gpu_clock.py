"""The simulated GPU's clock: how long one engine step holds the GPU in `wisp simulate`.

A real step is serial host work, then the forward (docs/benchmarks.md, "Engine figures"): the engine commits the
previous step's tokens and selects and plans the next batch before it can launch it, because the next decode needs
this step's tokens. The `steps` logs of the H200 runs 11–13 measure that gap at ≈ 43 µs per decode item (7–12 ms
at B ≈ 200, as long as the forward itself) and ≈ 0.4 ms + 24 µs per item for verify steps.

    step_s = forward(batch) + host(batch)

- forward: the estimator's prediction. For an estimator fitted on the paged (varlen) engine with padded features,
  the clock folds each padded feature into its packed twin (pad_rows → new, pad_past → ctx, pad_attn → attn): the
  two are equal on every homogeneous batch, so the prediction there is unchanged, while a mixed batch (decodes
  next to a 50-token prompt chunk) is no longer charged B × max(new) rows that a varlen engine never computes.
- host: `HostTime`, from the estimator file's `host` block when it has one, else `HostTime.default()` (the fit
  above, `bench/fit_host_time.py`), or none (`--host-time off`: the perfect loop of the simulator before this).
  The engine of H200 runs 18–20 spends less: `--host-time bench/results/sim_validation/host-run18-fit.json`
  (decode host time × 0.571, fitted on run 18, checked on run 20; docs/benchmarks.md).

The scheduler's own estimator is untouched: it stays what the server believed; only the clock is physics.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wisp_cloud.estimator import VerifyTimeEstimator
from wisp_cloud.sched import Batch

# padded feature -> the packed feature it equals on a homogeneous batch
_PACKED = {"pad_rows": "new", "pad_past": "ctx", "pad_attn": "attn"}


@dataclass(frozen=True)
class HostTime:
    """Serial host seconds per step: a fixed part plus a part per work item, for decode and verify steps apart.

    A step with any non-decode item (verify, prefill chunk) pays `verify_fixed_s`; else `decode_fixed_s`.
    Each decode item adds `decode_per_item_s`, each other item `verify_per_item_s`."""

    decode_fixed_s: float = 0.0
    decode_per_item_s: float = 0.0
    verify_fixed_s: float = 0.0
    verify_per_item_s: float = 0.0
    source: str = ""

    @classmethod
    def default(cls) -> HostTime:
        """The fit of H200 runs 11–13 (busy windows of their `steps` logs; bench/fit_host_time.py)."""
        return cls(
            decode_fixed_s=0.0,
            decode_per_item_s=43.2e-6,
            verify_fixed_s=0.405e-3,
            verify_per_item_s=23.7e-6,
            source="default: H200 runs 11-13 steps logs (bench/fit_host_time.py)",
        )

    @classmethod
    def from_ms(cls, d: dict[str, Any]) -> HostTime:
        """From an estimator file's `host` block (milliseconds, as bench/fit_host_time.py prints it)."""
        try:
            return cls(
                decode_fixed_s=float(d.get("decode_fixed_ms", 0.0)) / 1000,
                decode_per_item_s=float(d["decode_per_item_ms"]) / 1000,
                verify_fixed_s=float(d.get("verify_fixed_ms", 0.0)) / 1000,
                verify_per_item_s=float(d["verify_per_item_ms"]) / 1000,
                source=str(d.get("source", "estimator file")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"bad host block {d!r}: needs decode_per_item_ms and verify_per_item_ms"
            ) from exc

    def step_s(self, n_decode: int, n_other: int) -> float:
        if n_decode + n_other == 0:
            return 0.0
        fixed = self.verify_fixed_s if n_other else self.decode_fixed_s
        return fixed + self.decode_per_item_s * n_decode + self.verify_per_item_s * n_other


def resolve_host(est: dict[str, Any], choice: str) -> dict[str, Any] | None:
    """`--host-time`: "auto" (the estimator's `host` block, else the default), "default", "off", or a JSON file
    with a `host` block. Returns `HostTime` as a dict for `SimConfig.host` (None: no host time)."""
    from wisp_sdk.errors import WispError

    if choice == "off":
        return None
    if choice == "default":
        return asdict(HostTime.default())
    if choice == "auto":
        block = est.get("host")
        return asdict(HostTime.from_ms(block) if block else HostTime.default())
    try:
        data = json.loads(Path(choice).read_text())
        return asdict(HostTime.from_ms(data["host"] if "host" in data else data))
    except (OSError, json.JSONDecodeError, ValueError, KeyError) as exc:
        raise WispError(
            f"--host-time {choice}: expected auto, default, off or a JSON file with a host block ({exc})"
        ) from exc


def varlen_view(est: dict[str, Any]) -> dict[str, Any]:
    """The estimator with its padded features folded into their packed twins, when it was fitted on the paged
    (varlen) engine; any other estimator unchanged."""
    if est.get("meta", {}).get("backend") != "paged" or not any(f in _PACKED for f in est["features"]):
        return est
    coef = dict(zip(est["features"], est["coef"], strict=True))
    if est.get("group_rule") is not None:
        return est  # a grouped padded model: its padded features are not their packed twins
    for pad, packed in _PACKED.items():
        coef[packed] = coef.get(packed, 0.0) + coef.pop(pad, 0.0)
    feats = [f for f in est["features"] if f not in _PACKED]
    feats += [f for f in _PACKED.values() if f not in feats and coef.get(f)]
    return {**est, "features": feats, "coef": [coef.get(f, 0.0) for f in feats], "profile": []}


class GpuClock:
    """Seconds a batch holds the simulated GPU: forward (the estimator, varlen view) plus serial host time."""

    def __init__(self, est: dict[str, Any], host: dict[str, Any] | None, varlen: bool = True) -> None:
        self.forward = VerifyTimeEstimator.from_dict(varlen_view(est) if varlen else est)
        self.host = HostTime(**host) if host else None

    def step_s(self, batch: Batch) -> float:
        return self.step(batch)[0]

    def step(self, batch: Batch) -> tuple[float, float]:
        """(seconds the batch holds the GPU, the serial host seconds among them: 0 without a host model)."""
        forward = self.forward.predict(batch.shapes)
        if self.host is None:
            return forward, 0.0
        n_dec = sum(1 for r in batch.requests if r.kind == "decode")
        host = self.host.step_s(n_dec, len(batch) - n_dec)
        return forward + host, host
