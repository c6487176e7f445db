"""Re-score `wisp profile`'s timings offline: refit each estimator file's training batches with other feature
sets and report train and held-out MAPE on the same timings (the file keeps both; cloud/wisp_cloud/estimator.py).

A feature set is chosen on the training batches only (the knee of `new_over` too): the held-out batches are other
grid points, never fitted on. To check a change honestly, score it on a profile made with another `--seed` as well.

    python bench/estimator_rescore.py bench/results/estimator/h200-run2*.json \
        --out bench/results/estimator/rescore.json

A benchmark, not a test: it measures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

from wisp_cloud.estimator import VARLEN_FEATURES, VerifyTimeEstimator
from wisp_sdk.errors import WispError

SETS = {
    # one price per new token and per cached token (the varlen model until 2026-11-30)
    "six": ("groups", "batch", "new", "ctx", "miss", "attn"),
    # + the tiled attention kernel's grid, B × max context, when any item has more than one token
    "tiled": ("groups", "batch", "new", "ctx", "miss", "attn", "pad_verify"),
    "varlen": VARLEN_FEATURES,  # + the roofline's knee (`new_over`): today's
}


def rescore(path: Path) -> dict[str, object]:
    est = VerifyTimeEstimator.load(path)
    if not est.heldout:
        raise SystemExit(f"{path}: no held-out timings (made before 2026-11-30, or not by `wisp profile`)")
    row: dict[str, object] = {
        "file": str(path),
        "grid": est.meta.get("grid"),
        "train_batches": len(est._base),
        "heldout_batches": len(est.heldout),
        "heldout_noise_floor_pct": est.meta.get("heldout_noise_floor_pct"),
    }
    for name, features in SETS.items():
        fit = VerifyTimeEstimator.fitted(est._base, features=features, group_rule=est.group_rule)
        row[name] = {
            "train_mape_pct": round(fit.evaluate(est._base), 2),
            "heldout_mape_pct": round(fit.evaluate(est.heldout), 2),
            "knee": fit.knee,
        }
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path, help="estimator files written by `wisp profile`")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    try:
        rows = [rescore(p) for p in args.files]
    except WispError as exc:  # not an estimator file, or unreadable: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("file | grid | train/held-out batches | " + " | ".join(f"{n}: train / held-out %" for n in SETS))
    for r in rows:
        cells = []
        for n in SETS:
            s = r[n]
            assert isinstance(s, dict)
            knee = f" (knee {s['knee']})" if s["knee"] is not None else ""
            cells.append(f"{s['train_mape_pct']:.1f} / {s['heldout_mape_pct']:.1f}{knee}")
        print(
            f"{Path(str(r['file'])).name} | {r['grid']} | {r['train_batches']}/{r['heldout_batches']} | "
            + " | ".join(cells)
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "benchmark": "estimator_rescore",
            "date": date.today().isoformat(),
            "command": " ".join(["python", *sys.argv]),
            "rows": rows,
        }
        args.out.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
