"""`wisp calibrate`: fit the draft's rejection predictor against the real target and store it in the bundle."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="fit the Wisp controller's rejection predictor from draft/target traces (needs torch)",
        description=(
            "Runs the target (PyTorch) greedily on a prompt set, runs the draft bundle teacher-forced on the same "
            "text, fits P(accept) from the draft's confidence features, and stores it in the bundle's manifest."
        ),
    )
    p.add_argument("--draft", required=True, metavar="BUNDLE", help="draft bundle folder")
    p.add_argument(
        "--target", required=True, metavar="PATH", help="target HF model folder or known model name"
    )
    p.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="file: one prompt per line, or JSONL with 'prompt' or 'messages'",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="target tokens per prompt (default 64)")
    p.add_argument("--max-k", type=int, default=8, help="round length simulated for position features")
    p.add_argument("--device", default="cpu", help="device for the target (cpu | cuda)")
    p.add_argument("--raw", action="store_true", help="don't apply the chat template to prompts")
    p.add_argument(
        "--out", type=Path, default=None, help="write the predictor JSON here instead of the bundle"
    )
    p.set_defaults(func=run)


def _read_prompts(path: Path | None) -> list[str | list[dict]]:
    from wisp_sdk.calibration import DEFAULT_PROMPTS
    from wisp_sdk.errors import WispError

    if path is None:
        return list(DEFAULT_PROMPTS)
    if not path.is_file():
        raise WispError(f"--prompts {path}: no such file")
    out: list[str | list[dict]] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            obj = json.loads(line)
            out.append(obj.get("messages") or obj["prompt"])
        else:
            out.append(line)
    if not out:
        raise WispError(f"--prompts {path} holds no prompts")
    return out


def run(args: argparse.Namespace) -> int:
    from wisp_export.calibrate import target_greedy_traces
    from wisp_export.progress import bar

    from wisp_sdk.bundle import load_manifest
    from wisp_sdk.calibration import fit_from_traces, store_predictor
    from wisp_sdk.draft_runner import DraftRunner
    from wisp_sdk.tokenizer import DraftTokenizer

    load_manifest(args.draft)  # a clear error if it is not a bundle, before loading any model
    tok = DraftTokenizer(args.draft)
    prompts = []
    for p in _read_prompts(args.prompts):
        if isinstance(p, list):
            text = tok.apply_chat_template(p)
        elif args.raw or not tok.chat_template:
            text = p
        else:
            text = tok.apply_chat_template([{"role": "user", "content": p}])
        prompts.append(tok.encode(text))
    with bar(total=len(prompts), desc="target traces", unit="prompt") as pb:
        conts = target_greedy_traces(
            args.target, prompts, args.max_new_tokens, args.device, progress=pb.update
        )
    runner = DraftRunner(args.draft)
    predictor, report = fit_from_traces(runner, prompts, conts, max_k=args.max_k)
    predictor.meta["target"] = str(args.target)
    if args.out:
        args.out.write_text(json.dumps(predictor.to_dict(), indent=2) + "\n")
        where = args.out
    else:
        where = store_predictor(args.draft, predictor)
    print(json.dumps(report, indent=2))
    print(f"predictor written to {where}")
    return 0
