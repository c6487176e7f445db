"""Merge `wisp bench` results whose arms ran side by side (e.g. centralized + SLED on one GPU, WISP on another
GPU of the same machine) into one bench.json, and print its regime-table rows (docs/benchmarks.md, "regimes").

    python bench/merge_bench.py OUT.json A/bench.json B/bench.json --model "Qwen2.5-32B shape" --gpu H200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wisp_cloud.fleet.capacity import finalize, print_summary


def table_rows(result: dict, model: str, gpu: str) -> list[str]:
    cfg = result["config"]
    devs = {d["name"]: d for d in cfg.get("device_profiles", [cfg["device_profile"]])}
    links = {x["name"]: x for x in cfg.get("link_profiles", [cfg["link_profile"]])}
    rows = []
    for r in result["regimes"]:
        dev = devs.get(r.get("device", ""), cfg["device_profile"])
        link = links.get(r.get("link", ""), cfg["link_profile"])
        device = (
            f"{dev['name']} ({dev['decode_ms']:.1f} ms/token), {link['name']} ({link['rtt_ms']:g} ms RTT)"
        )
        swept = [
            p
            for p in result["points"]
            if p.get("link", link["name"]) == link["name"]
            and (p["policy"] == "centralized" or p.get("device", dev["name"]) == dev["name"])
        ]

        def bound(name: str, p: dict = r["policies"], swept: list = swept) -> tuple[float, str] | None:
            """(capacity, "=" | "<" | ">="): below the smallest N swept, at least the largest, or interpolated."""
            d = p.get(name)
            if not d:
                return None
            if not d["capacity_interp"]:  # even the smallest N swept missed the target
                return float(min(pt["n"] for pt in swept if pt["policy"] == name)), "<"
            return float(d["capacity_interp"]), ">=" if d["capacity_is_lower_bound"] else "="

        def cap(name: str, p: dict = r["policies"]) -> str:
            b = bound(name)
            if b is None:
                return "—"
            text = {"<": f"< {b[0]:.0f}", ">=": f"≥ {b[0]:.0f}", "=": f"{b[0]:.0f}"}[b[1]]
            d = p[name]
            return text + (
                f" (k={d['controller'].split(':')[1]})" if name == "sled" and d.get("controller") else ""
            )

        def ratio(base: str) -> str:
            """WISP ÷ base, with the side the bounds allow ("—" when both are bounds, or either is missing)."""
            w, b = bound("wisp"), bound(base)
            if w is None or b is None or not b[0] or (w[1] != "=" and b[1] != "="):
                return "—"
            v = f"{w[0] / b[0]:.2f}×"
            side = {("=", "="): "", ("<", "="): "< ", (">=", "="): "≥ ", ("=", "<"): "> ", ("=", ">="): "≤ "}
            return side[(w[1], b[1])] + v

        rows.append(
            f"| {model} | {gpu} | {r['slo_tpot_ms']:g} | {device} | {cfg.get('workload') or 'custom'} | "
            f"{cap('centralized')} | {cap('sled')} | {cap('wisp')} | "
            f"{ratio('centralized')} | {ratio('sled')} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--model", default="?")
    ap.add_argument("--gpu", default="?")
    ap.add_argument("--attainment", type=float, default=0.9)
    a = ap.parse_args()
    a.inputs = [p for p in a.inputs if Path(p).is_file()]
    parts = [json.loads(Path(p).read_text()) for p in a.inputs]
    if not parts:
        raise SystemExit("merge_bench: none of the inputs exists")
    merged = dict(parts[0])
    merged["points"] = [pt for part in parts for pt in part["points"]]
    merged["merged_from"] = [
        {"input": p, "config": part["config"]} for p, part in zip(a.inputs, parts, strict=True)
    ]
    finalize(merged, a.attainment)
    Path(a.out).write_text(json.dumps(merged, indent=1))
    print_summary(merged)
    print("\n".join(table_rows(merged, a.model, a.gpu)))


if __name__ == "__main__":
    main()
