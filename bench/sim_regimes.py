"""Where edge speculation pays, in `wisp simulate`: capacity of WISP ÷ centralized and ÷ SLED against model size
(one GPU estimator per model), TPOT SLO, draft speed (device profiles) and RTT (link profiles).

Each cell is a capacity search (`simulate.find_capacity`: largest N devices on one GPU with ≥ 90 % SLO attainment)
per policy. Devices and links are varied one at a time around a base (the bench's Jetson + wifi-metro), plus the
fastest pair (mac-m4 + metro-edge); centralized is searched once per model and SLO, on the base link (it has no
draft, and a link's fixed delay shifts every token of a stream alike: TPOT does not see it).
Prompts and output lengths come from a bench result (--like) so the load is the validated one.

    python bench/sim_regimes.py --estimators 7B=bench/results/capacity/est-h200-run12-7b-online.json,\\
32B=bench/results/capacity/est-h200-run13-32b-online.json --like bench/results/capacity/h200-run13-32b-bench.json \\
        --out bench/results/sim_regimes/regimes -- --duration 8 --warmup 2 --no-hybrid

Any `wisp simulate` flag can follow `--`. Writes OUT.json (every search) and OUT.png (the ratios).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from wisp_cloud.fleet import cli_simulate
from wisp_cloud.fleet.profiles import get_device, get_link
from wisp_cloud.fleet.sim_driver import sim_config
from wisp_cloud.fleet.sim_search import estimator_or_default, find_capacity
from wisp_cloud.fleet.trace import load_trace


def cells(devices: list[str], links: list[str], base: tuple[str, str]) -> list[tuple[str, str]]:
    """(device, link) pairs: each device on the base link, each link with the base device, the fastest pair."""
    out = [(d, base[1]) for d in devices] + [(base[0], lnk) for lnk in links]
    out.append((devices[-1], links[0]))  # --devices and --links list the fastest last / first
    return list(dict.fromkeys(out))


def _search(task: dict[str, Any]) -> dict[str, Any]:
    t = time.perf_counter()
    cap, gp = find_capacity(task.pop("cfg"))
    return {**task, "capacity": cap, "goodput": gp, "wall_s": round(time.perf_counter() - t, 1)}


def _ratio(a: float, b: float) -> float | None:
    """a ÷ b; None when b is 0 or both are under 8 devices (a search's first step: noise, not a ratio)."""
    return round(a / b, 3) if b and max(a, b) >= 8 else None


def _y(v: float | None) -> float:
    return float("nan") if v is None else v


def table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, SLO, device, link): capacities and the two ratios (SLED: its best k)."""
    cen = {(r["model"], r["slo"]): r["capacity"] for r in results if r["policy"] == "centralized"}
    rows: dict[tuple, dict[str, Any]] = {}
    for r in results:
        if r["policy"] == "centralized":
            continue
        key = (r["model"], r["slo"], r["device"], r["link"])
        row = rows.setdefault(
            key,
            {
                "model": key[0],
                "slo": key[1],
                "device": key[2],
                "link": key[3],
                "sled": 0,
                "sled_k": "",
                "wisp": 0,
            },
        )
        if r["policy"] == "wisp-hybrid":
            row["wisp_hybrid"] = r["capacity"]
        elif r["policy"] == "wisp":
            row["wisp"] = r["capacity"]
        elif r["capacity"] > row["sled"]:
            row["sled"], row["sled_k"] = r["capacity"], r["controller"]
    for key, row in rows.items():
        row["centralized"] = cen.get((key[0], key[1]), 0)
        row["wisp_over_centralized"] = _ratio(row["wisp"], row["centralized"])
        row["wisp_over_sled"] = _ratio(row["wisp"], row["sled"])
        if "wisp_hybrid" in row:
            row["wisp_hybrid_over_centralized"] = _ratio(row["wisp_hybrid"], row["centralized"])
            row["wisp_hybrid_over_sled"] = _ratio(row["wisp_hybrid"], row["sled"])
    return list(rows.values())


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["table"]
    base_dev, base_link = result["base"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    series = sorted({(r["model"], r["slo"]) for r in rows}, key=lambda x: (x[0], -x[1]))
    colors = ["tab:blue", "tab:cyan", "tab:red", "tab:orange", "tab:green", "tab:olive"]
    for i, (model, slo) in enumerate(series):
        c = colors[i % len(colors)]
        dev_rows = sorted(
            (r for r in rows if r["model"] == model and r["slo"] == slo and r["link"] == base_link),
            key=lambda r: get_device(r["device"]).decode_ms,
        )
        link_rows = sorted(
            (r for r in rows if r["model"] == model and r["slo"] == slo and r["device"] == base_dev),
            key=lambda r: get_link(r["link"]).rtt_ms,
        )
        for col, (key, ylabel) in enumerate(
            (("wisp_over_centralized", "WISP ÷ centralized"), ("wisp_over_sled", "WISP ÷ SLED (best k)"))
        ):
            hkey = key.replace("wisp_", "wisp_hybrid_", 1)
            hd = [r for r in dev_rows if hkey in r]
            hl = [r for r in link_rows if hkey in r]
            if hd:
                xs_h = [get_device(r["device"]).decode_ms for r in hd]
                axes[0][col].plot(xs_h, [_y(r[hkey]) for r in hd], "x--", color=c, alpha=0.7)
            if hl:
                axes[1][col].plot(
                    [get_link(r["link"]).rtt_ms for r in hl],
                    [_y(r[hkey]) for r in hl],
                    "x--",
                    color=c,
                    alpha=0.7,
                )
            xs = [get_device(r["device"]).decode_ms for r in dev_rows]
            axes[0][col].plot(
                xs, [_y(r[key]) for r in dev_rows], "o-", color=c, label=f"{model}, TPOT ≤ {slo:g} ms"
            )
            for x, r in zip(xs, dev_rows, strict=True):
                axes[0][col].annotate(r["device"], (x, _y(r[key])), fontsize=7, alpha=0.6)
            xl = [get_link(r["link"]).rtt_ms for r in link_rows]
            axes[1][col].plot(
                xl, [_y(r[key]) for r in link_rows], "o-", color=c, label=f"{model}, TPOT ≤ {slo:g} ms"
            )
            for x, r in zip(xl, link_rows, strict=True):
                axes[1][col].annotate(r["link"], (x, _y(r[key])), fontsize=7, alpha=0.6)
            axes[0][col].set_xscale("log")
            axes[0][col].set_xlabel(f"draft time per token, ms, log scale (device profile; link {base_link})")
            axes[1][col].set_xlabel(f"RTT, ms (link profile; device {base_dev})")
            for ax in (axes[0][col], axes[1][col]):
                ax.set_ylabel(f"capacity {ylabel}")
                ax.axhline(1.0, color="gray", lw=0.8, ls="--")
                ax.grid(alpha=0.3)
    for ax in axes.flat:
        ax.set_ylim(bottom=0)
    axes[0][0].plot([], [], "k-o", label="WISP --no-hybrid (validated)")
    axes[0][0].plot([], [], "k--x", alpha=0.7, label="WISP with the hybrid (not validated)")
    axes[0][0].legend(fontsize=8)
    ests = ", ".join(f"{m}: {Path(p).name}" for m, p in result["estimators"].items())
    fig.suptitle(
        "Where edge speculation pays (wisp simulate): capacity = devices per GPU at ≥ 90 % SLO attainment; "
        "GPU clock = forward + serial host time\n(within 15 % of the H200 bench at 32B, docs/benchmarks.md); one "
        f"simulated NVIDIA H200 per model\n({ests}); TTFT ≤ 2 s; code10 prompts; SLED k = "
        f"{result.get('sled_k', '3')}; dev VM, {result['date']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--estimators", required=True, help="MODEL=EST.json,... one GPU estimator per model size")
    p.add_argument("--like", required=True, help="a bench.json whose prompts and output lengths to use")
    p.add_argument("--slo", default="60,30", help="TPOT SLOs, ms")
    p.add_argument("--devices", default="phone,jetson,mac-m4", help="device profiles, slowest first")
    p.add_argument("--links", default="metro-edge,wifi-metro,lte", help="link profiles, shortest RTT first")
    p.add_argument("--base", default="jetson,wifi-metro", help="the device and link the others vary around")
    p.add_argument(
        "--sled-k", default="3", help="FixedK values for SLED (best reported); 3 was the better in runs 12/13"
    )
    p.add_argument(
        "--arms",
        default="centralized,sled,wisp",
        help="any of centralized,sled,wisp,wisp-hybrid (wisp-hybrid: the wisp policy with the load-adaptive hybrid "
        "and truncated verify on, whatever --no-hybrid says)",
    )
    p.add_argument("--merge", help="a previous OUT.json: its searches are kept and shown with the new ones")
    p.add_argument("--out", default="runs/sim-regimes/regimes")
    p.add_argument("--replot", help="an OUT.json: redraw its chart and table, run nothing")
    own, rest = p.parse_known_args()
    if own.replot:
        done = json.loads(Path(own.replot).read_text())
        done["table"] = table(done["searches"])
        Path(own.replot).write_text(json.dumps(done, indent=1))
        plot(done, Path(own.replot).with_suffix(".png"))
        return 0
    rest = [a for a in rest if a != "--"]
    sim = argparse.ArgumentParser()
    cli_simulate.add_parser(sim.add_subparsers())
    args = sim.parse_args(["simulate", "--max-batch", "256", "--gap", "1", "--procs", "2", *rest])
    cli_simulate.resolve_workload_args(args, trace=True)
    like = json.loads(Path(own.like).read_text())["config"]
    trace = load_trace(args.trace)
    ests = dict(kv.split("=", 1) for kv in own.estimators.split(","))
    devices, links = own.devices.split(","), own.links.split(",")
    base = tuple(own.base.split(","))
    arms = own.arms.split(",")
    tasks = []
    for model, path in ests.items():
        est = estimator_or_default(path)
        for slo in (float(s) for s in own.slo.split(",")):

            def cfg(policy: str, ctl: str, dev: str, link: str, est: dict = est, slo: float = slo) -> Any:
                over = {
                    "slo_tpot_ms": slo,
                    "prompt_tokens": like["prompt_tokens"],
                    "lengths": like["lengths"],
                }
                c = sim_config(args, policy, ctl, trace, est, **over)
                c.device, c.link = get_device(dev), get_link(link)
                return c

            if "centralized" in arms:
                tasks.append({"model": model, "slo": slo, "device": "", "link": base[1], "policy": "centralized",
                              "controller": "", "cfg": cfg("centralized", "", base[0], base[1])})  # fmt: skip
            for dev, link in cells(devices, links, base):  # type: ignore[arg-type]
                for ctl in [f"fixed:{k}" for k in own.sled_k.split(",")] if "sled" in arms else []:
                    tasks.append({"model": model, "slo": slo, "device": dev, "link": link, "policy": "sled",
                                  "controller": ctl, "cfg": cfg("sled", ctl, dev, link)})  # fmt: skip
                if "wisp" in arms:
                    tasks.append({"model": model, "slo": slo, "device": dev, "link": link, "policy": "wisp",
                                  "controller": "wisp", "cfg": cfg("wisp", "wisp", dev, link)})  # fmt: skip
                if "wisp-hybrid" in arms:
                    hyb = replace(cfg("wisp", "wisp", dev, link), hybrid=True)
                    tasks.append({"model": model, "slo": slo, "device": dev, "link": link, "policy": "wisp-hybrid",
                                  "controller": "wisp", "cfg": hyb})  # fmt: skip
    out = Path(own.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "kind": "sim-regimes",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "estimators": ests,
        "like": own.like,
        "base": list(base),
        "sled_k": own.sled_k,
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "searches": json.loads(Path(own.merge).read_text())["searches"] if own.merge else [],
    }
    t0 = time.perf_counter()
    print(f"[regimes] {len(tasks)} capacity searches on {args.procs} processes", flush=True)
    with ProcessPoolExecutor(args.procs) as pool:
        for r in pool.map(_search, tasks):
            result["searches"].append(r)
            print(
                f"[regimes] {r['model']:<4} tpot≤{r['slo']:g} {r['device'] or '-':<7} {r['link']:<10} "
                f"{r['policy']:<11} {r['controller']:<8} capacity {r['capacity']:>5} goodput {r['goodput']:7.0f} "
                f"({r['wall_s']:.0f}s)",
                flush=True,
            )
            result["table"] = table(result["searches"])
            out.with_suffix(".json").write_text(json.dumps(result, indent=1))  # partial results survive
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["table"] = table(result["searches"])
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    for row in result["table"]:
        print(
            f"[regimes] {row['model']:<4} tpot≤{row['slo']:g} {row['device']:<7} {row['link']:<10} C {row['centralized']:>5} "
            f"S {row['sled']:>5} ({row['sled_k']}) W {row['wisp']:>5}  W/C {row['wisp_over_centralized']}  "
            f"W/S {row['wisp_over_sled']}  hybrid W {row.get('wisp_hybrid', '-')} W/C "
            f"{row.get('wisp_hybrid_over_centralized', '-')}"
        )
    print(
        f"[regimes] wrote {out.with_suffix('.json')} and {out.with_suffix('.png')} ({result['wall_s']:.0f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
