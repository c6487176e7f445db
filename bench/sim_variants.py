"""`wisp simulate --validate` with one mechanism switched off, to see what it is worth in the simulator (dev VM).

    python bench/sim_variants.py --variant no-probes --seeds 8 -- \
      bench/results/capacity/h200-run51-32b-humaneval-w20-bench.json --procs 1 \
      --estimator bench/results/estimator/est-h200-32b-varlen.json --policies centralized,wisp --out DIR

Variants: `default` (as built), `no-probes` (the regime enlists no probes in its centralized mode),
`no-learned-offer` (devices offer `start_on_server` by the prefill rule only, as before `server_decodes_next`),
`unmeasured-decoding` (the regime decodes the fleet for as many sessions as N_dec says, whatever the server's recent
steps held: the regime without its measured gate).
`--seeds` replaces the validation's seeds per point (sim_validate.SEEDS). Everything after `--` is `wisp simulate
--validate`'s. A what-if: it prints and writes what `--validate` does, and asserts nothing.
"""

from __future__ import annotations

import argparse
import sys

import wisp_cloud.fleet.sim_validate as sim_validate
import wisp_cloud.fleet.simulate as simulate
import wisp_cloud.sched.regime as regime_module
import wisp_sdk.session as session
from wisp_sdk.cli import main as wisp


def _no_probes() -> None:
    regime = simulate.Regime

    def without_probes(*args, **kw):  # type: ignore[no-untyped-def]
        r = regime(*args, **kw)
        r.probe_every = 1 << 30
        return r

    simulate.Regime = without_probes  # type: ignore[misc,assignment]


def _unmeasured_decoding() -> None:
    regime_module.MEASURED_SLACK = float(
        "inf"
    )  # decoding for as many sessions as N_dec says, measured or not


def _no_learned_offer() -> None:
    session.server_decodes_next = lambda *_: False  # type: ignore[assignment]


VARIANTS = {
    "default": lambda: None,
    "no-probes": _no_probes,
    "no-learned-offer": _no_learned_offer,
    "unmeasured-decoding": _unmeasured_decoding,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="default")
    ap.add_argument("--seeds", type=int, default=sim_validate.SEEDS)
    ap.add_argument("validate", nargs=argparse.REMAINDER, help="-- BENCH.json and `wisp simulate` options")
    args = ap.parse_args()
    rest = args.validate[1:] if args.validate[:1] == ["--"] else args.validate
    if not rest:
        ap.error("give the bench file and `wisp simulate` options after --")
    VARIANTS[args.variant]()
    sim_validate.SEEDS = args.seeds
    return wisp(["simulate", "--validate", *rest])


if __name__ == "__main__":
    sys.exit(main())
