"""Token trees on the real pair (dev VM CPU): what a sibling commits in serving, not only in a trace.

    .venv/bin/python bench/real_pair_trees.py --draft runs/qwen2.5-coder-0.5b-q8 \\
      --target qwen2.5-coder-1.5b-instruct --out bench/results/trees/real_pair_dev_vm.json

Starts `wisp serve` on the target (CPU, its default engine) and drives it with the SDK over websockets, drafting
with the ONNX bundle: each prompt (code10, HumanEval, ShareGPT: `--per-set` of each) is generated greedily with the
`wisp` controller and again with `wisp+tree`. Records, per arm: whether the tokens equal the other arm's (greedy
output never depends on the draft), rounds, tokens committed per round, siblings sent and committed. CPU seconds
are not GPU seconds: the round counts are the result, not the times. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "cloud"), str(ROOT / "sdk")]

from wisp_cloud.fleet.workload import load_prompts  # noqa: E402
from wisp_sdk import EdgeClient  # noqa: E402


def _serve(target: str, threads: int) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "wisp_sdk.cli",
        "serve",
        "--target",
        target,
        "--port",
        "0",
        "--threads",
        str(threads),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"listening on (wss?://\S+)", line)
            if m and not found:
                found.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(600) or not found:
        proc.kill()
        raise SystemExit("wisp serve did not start")
    return proc, found[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draft", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-set", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    sets = {
        "code10": ROOT / "bench/prompts/code10.jsonl",
        "humaneval": ROOT / "bench/workloads/humaneval.json",
        "sharegpt": ROOT / "bench/workloads/sharegpt.json",
    }
    proc, url = _serve(args.target, args.threads)
    rows = []
    try:
        with EdgeClient(url, args.draft, threads=args.threads) as client:
            for name, path in sets.items():
                for item in load_prompts(path)[: args.per_set]:
                    prompt = [{"role": "user", "content": item["prompt"]}]
                    row: dict = {"set": name}
                    tokens = {}
                    for ctl in ("wisp", "wisp+tree"):
                        t0 = time.perf_counter()
                        res = client.generate(prompt, max_new_tokens=args.max_new_tokens, controller=ctl)
                        rounds = res.stats.rounds
                        tokens[ctl] = res.token_ids
                        row[ctl] = {
                            "new_tokens": res.stats.new_tokens,
                            "rounds": len(rounds),
                            "tokens_per_round": sum(r.committed for r in rounds) / max(1, len(rounds)),
                            "drafted": sum(r.drafted for r in rounds),
                            "accepted": sum(r.accepted for r in rounds),
                            "siblings": sum(r.siblings for r in rounds),
                            "sibling_hits": sum(r.sibling for r in rounds),
                            "wall_s": round(time.perf_counter() - t0, 2),
                        }
                    row["identical"] = tokens["wisp"] == tokens["wisp+tree"]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        proc.terminate()
        proc.wait(30)

    def total(ctl: str, key: str) -> float:
        return sum(r[ctl][key] for r in rows)

    summary = {
        ctl: {
            "rounds": total(ctl, "rounds"),
            "tokens_per_round": (total(ctl, "new_tokens") - len(rows)) / max(1, total(ctl, "rounds")),
            "siblings_per_round": total(ctl, "siblings") / max(1, total(ctl, "rounds")),
            "sibling_hit_rate": total(ctl, "sibling_hits") / max(1, total(ctl, "siblings")),
        }
        for ctl in ("wisp", "wisp+tree")
    }
    out = {
        "machine": f"{platform.node()} (CPU, {platform.processor() or platform.machine()})",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "all_identical": all(r["identical"] for r in rows),
        "summary": summary,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["summary"], indent=1), "identical:", out["all_identical"])
    return 0 if out["all_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
