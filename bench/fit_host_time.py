"""Fit the simulator's serial host-time model (cloud/wisp_cloud/fleet/gpu_clock.py) from servers' `steps` logs.

Each `steps` line (cloud/wisp_cloud/step_stats.py) is one 10 s window: mean batch size, forward p50 and the host
gap before each forward (p50: selection, planning and the previous step's commit, which the next forward waits
for). Per arm kind (centralized = decode steps; sled/wisp = verify steps) this fits host_ms = fixed + per_item · B
by least squares over the busy windows (busy ≥ 0.5: in idle windows the gap holds no commit). A WISP arm with the
regime runs decode or verify steps by its mode: each of its windows counts as the kind of at least 80 % of its
items (rounds against decodes), and not at all when neither is.

    python bench/fit_host_time.py bench/results/capacity/h200-run1{1,2,3}-steps.txt [--check RUN-steps.txt ...]

--check prints the fitted model's error on other logs (out of sample).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys

_STEP = re.compile(
    r"batch_mean=([\d.]+) tokens_mean=([\d.]+) forward_ms_p50=([\d.]+).*?host_ms_p50=([\d.]+).*?busy=([\d.]+)"
)
_POLICY = re.compile(r"policy=(\w+)")
_MIX = re.compile(r"rounds_mean=([\d.]+) decodes_mean=([\d.]+)")
# a WISP window counts as decode (verify) steps when this share of its items are decodes (rounds)
MIXED_SHARE = 0.8


def windows(path: str) -> list[tuple[str, float, float, float, float]]:
    """(arm kind, batch mean, tokens mean, host p50 ms, busy) per busy window of a steps log."""
    out = []
    kind = "verify"
    opener = gzip.open if path.endswith(".gz") else open  # the larger logs are kept gzipped
    for line in opener(path, "rt", encoding="utf-8"):
        if "server_start" in line or "engine backend" in line or "policy_switch" in line:
            # one server per arm, or (since run 18) one server whose policy the bench switches between arms
            m = _POLICY.search(line)
            if m and m.group(1) == "wisp" and "policy_switch" in line:
                kind = "mixed"  # WISP with the regime runs decode or verify steps by its mode: neither kind
            elif m:
                kind = "decode" if m.group(1) == "centralized" else "verify"
        m = _STEP.search(line)
        if m and "steps n=" in line:
            b, t, _f, h, busy = (float(x) for x in m.groups())
            k = kind
            if kind == "mixed":
                mix = _MIX.search(line)
                rounds, decodes = (float(x) for x in mix.groups()) if mix else (0.0, 0.0)
                k = (
                    "verify"
                    if rounds >= MIXED_SHARE * b
                    else "decode"
                    if decodes >= MIXED_SHARE * b
                    else "mixed"
                )
            if busy >= 0.5 and k != "mixed":
                out.append((k, b, t, h, busy))
    return out


def fit(rows: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares host = a + b·B, both ≥ 0."""
    n = len(rows)
    mx = sum(b for b, _ in rows) / n
    my = sum(h for _, h in rows) / n
    sxx = sum((b - mx) ** 2 for b, _ in rows)
    slope = max(0.0, sum((b - mx) * (h - my) for b, h in rows) / sxx) if sxx else 0.0
    a = my - slope * mx
    if a < 0:  # through the origin
        slope, a = sum(b * h for b, h in rows) / sum(b * b for b, _ in rows), 0.0
    return a, slope


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--check", nargs="*", default=[], help="logs to test the fit on (out of sample)")
    args = ap.parse_args()
    train = [w for p in args.logs for w in windows(p)]
    model: dict[str, float] = {}
    for kind in ("decode", "verify"):
        rows = [(b, h) for k, b, _t, h, _ in train if k == kind]
        if len(rows) < 2:
            print(f"{kind}: too few busy windows ({len(rows)})", file=sys.stderr)
            continue
        a, b = fit(rows)
        model[f"{kind}_fixed_ms"] = round(a, 3)
        model[f"{kind}_per_item_ms"] = round(b, 4)
        err = [abs(a + b * x - h) for x, h in rows]
        resid = sum(err) / len(err)
        print(
            f"{kind}: {len(rows)} windows, host_ms = {a:.3f} + {b * 1000:.1f} µs × B; mean |residual| {resid:.2f} ms"
        )
    for path in args.check:
        for k, b, _t, h, _ in windows(path):
            pred = model[f"{k}_fixed_ms"] + model[f"{k}_per_item_ms"] * b
            print(f"check {path}: {k} B={b:.0f} host p50 {h:.2f} ms, model {pred:.2f} ms")
    print(json.dumps({"host": {**model, "source": "bench/fit_host_time.py " + " ".join(args.logs)}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
