"""PNG plots for `wisp bench` and `wisp simulate` results (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_COLORS = {"wisp": "tab:green", "sled": "tab:orange", "centralized": "tab:blue"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _best_points(result: dict[str, Any]) -> dict[str, list[dict]]:
    """Per policy, the points of its reported variant (sled: best k), sorted by N."""
    per = result.get("policies", {})
    out: dict[str, list[dict]] = {}
    for p in result["points"]:
        ctl = per.get(p["policy"], {}).get("controller", p["controller"] or "")
        if (p["controller"] or "") == (ctl or ""):
            out.setdefault(p["policy"], []).append(p)
    return {k: sorted(v, key=lambda p: p["n"]) for k, v in out.items()}


def bench_title(result: dict[str, Any], gpu: str = "") -> str:
    """Model, GPU, SLO, fleet and date, so a plot can be read alone."""
    cfg = result["config"]
    serve = cfg.get("serve", [])
    model = "?"
    for flag in ("--random-config", "--target"):
        if flag in serve:
            model = serve[serve.index(flag) + 1] + (" (random weights)" if flag == "--random-config" else "")
    slo = cfg["slo"]
    date = str(result.get("started", ""))[:16].replace("T", " ")
    gpu = gpu or ("cuda" if "cuda" in serve else "cpu")
    dev, link = cfg.get("device_profile", "?"), cfg.get("link_profile", "?")
    dev = dev.get("name", "?") if isinstance(dev, dict) else dev
    link = link.get("name", "?") if isinstance(link, dict) else link
    return (
        f"{model} on {gpu}, {date} UTC\n"
        f"SLO TTFT {slo['ttft_ms']:.0f} ms, TPOT {slo['tpot_ms']:.0f} ms; {dev} devices, {link} link"
    )


def plot_bench(result: dict[str, Any], out: Path, prefix: str = "bench", gpu: str = "") -> list[str]:
    plt = _plt()
    pts = _best_points(result)
    target = result["config"].get("target_attainment", 0.9)
    title = bench_title(result, gpu)
    files = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, ps in pts.items():
        label = policy + (f" ({ps[0]['controller']})" if ps[0]["controller"] and policy == "sled" else "")
        ax.plot(
            [p["n"] for p in ps], [p["attainment"] for p in ps], "o-", label=label, color=_COLORS.get(policy)
        )
    ax.axhline(target, ls="--", color="gray", lw=1, label=f"capacity threshold {target:.0%}")
    ax.set_title("SLO attainment\n" + title, fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("edge devices N")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.grid(alpha=0.3)
    f = out / f"{prefix}-attainment.png"
    fig.tight_layout()
    fig.savefig(f, dpi=110)
    plt.close(fig)
    files.append(str(f))

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, ps in pts.items():
        ax.plot(
            [p["n"] for p in ps],
            [p["goodput_tok_s"] for p in ps],
            "o-",
            label=policy,
            color=_COLORS.get(policy),
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("edge devices N")
    ax.set_ylabel("goodput (tokens/s of SLO-meeting sessions)")
    ax.set_title("goodput\n" + title, fontsize=7)
    ax.legend()
    ax.grid(alpha=0.3)
    f = out / f"{prefix}-goodput.png"
    fig.tight_layout()
    fig.savefig(f, dpi=110)
    plt.close(fig)
    files.append(str(f))

    common = set.intersection(*[{p["n"] for p in ps} for ps in pts.values()]) if pts else set()
    if common:
        fig, ax = plt.subplots(figsize=(6, 4))
        ns = sorted(common)
        for n in [ns[len(ns) // 2], ns[-1]] if len(ns) > 1 else ns:
            for policy, ps in pts.items():
                p = next(p for p in ps if p["n"] == n)
                xs = p.get("tpot_ms") or []
                if not xs:
                    continue
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ls = "-" if n == ns[-1] else ":"
                ax.step(xs, ys, ls, where="post", label=f"{policy} N={n}", color=_COLORS.get(policy))
        slo = result["config"]["slo"]["tpot_ms"]
        ax.axvline(slo, ls="--", color="gray", lw=1, label=f"TPOT SLO {slo:.0f} ms")
        ax.set_title("TPOT per session\n" + title, fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("TPOT per session (ms, client-measured)")
        ax.set_ylabel("CDF")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        f = out / f"{prefix}-tpot-cdf.png"
        fig.tight_layout()
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(str(f))
    return files


def plot_sweeps(sweeps: dict[str, list[dict]], out: Path, prefix: str = "sim") -> list[str]:
    """Capacity vs a swept parameter, one panel per parameter, one line per policy."""
    plt = _plt()
    if not sweeps:
        return []
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4), squeeze=False)
    for ax, (param, rows) in zip(axes[0], sweeps.items(), strict=True):
        for policy in dict.fromkeys(r["policy"] for r in rows):
            rs = [r for r in rows if r["policy"] == policy]
            ax.plot(
                [r["value"] for r in rs],
                [r["capacity"] for r in rs],
                "o-",
                label=policy,
                color=_COLORS.get(policy),
            )
        ax.set_xlabel(param)
        ax.set_ylabel("capacity (devices at ≥90% SLO)")
        ax.grid(alpha=0.3)
        ax.legend()
    f = out / f"{prefix}-capacity-sweeps.png"
    fig.tight_layout()
    fig.savefig(f, dpi=110)
    plt.close(fig)
    return [str(f)]
