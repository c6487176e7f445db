"""`wisp generate`: stream a completion from a WISP server, drafting locally with a bundle."""

from __future__ import annotations

import argparse
import json
import os
import sys

from wisp_sdk.argtypes import number, temperature


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text: draft on this device, verify on a WISP server",
        description="Stream a completion to stdout, then print one stats line (or one JSON object with --json).",
    )
    p.add_argument("prompt", metavar="PROMPT", help="the prompt ('-' reads it from stdin)")
    p.add_argument("--server", required=True, help="verifier URL, e.g. ws://127.0.0.1:8765")
    p.add_argument(
        "--draft", required=True, metavar="BUNDLE", help="draft bundle folder made by `wisp export`"
    )
    p.add_argument(
        "--token", default=os.environ.get("WISP_TOKEN"), help="bearer token (default: $WISP_TOKEN)"
    )
    p.add_argument(
        "--ca-file", help="CA certificate (PEM) to verify a wss:// server with (default: the system's)"
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object {text, token_ids, stats} instead"
    )
    p.add_argument("--max-new-tokens", type=number(int, min=1), default=256)
    p.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=number(float, above=0.0, max=1.0), default=1.0)
    p.add_argument("--top-k", type=number(int, min=0), default=0)
    p.add_argument("--seed", type=int, default=None, help="seed for the server's and the draft's sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--controller",
        default="wisp",
        help="wisp | wisp+ahead | wisp+cap | wisp+tree | fixed:K (default: wisp)",
    )
    p.add_argument("--mode", choices=["speculative", "centralized"], default="speculative")
    p.add_argument(
        "--raw", action="store_true", help="send the prompt as is, without the bundle's chat template"
    )
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument(
        "--threads", type=number(int, min=1), default=None, help="ONNX Runtime threads for the draft"
    )
    p.add_argument("--ttft-ms", type=number(float, above=0.0), default=None, help="SLO: time to first token")
    p.add_argument(
        "--tpot-ms", type=number(float, above=0.0), default=None, help="SLO: time per output token"
    )
    p.add_argument(
        "--resume-deadline",
        type=number(float, above=0.0),
        default=30.0,
        help="seconds to keep trying to resume",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wisp_sdk.client import EdgeClient
    from wisp_sdk.controllers import make_controller
    from wisp_sdk.errors import WispError
    from wisp_sdk.protocol import SLO

    prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        make_controller(args.controller)
    except ValueError as exc:
        raise WispError(str(exc)) from exc
    slo_kw = {k: v for k, v in (("ttft_ms", args.ttft_ms), ("tpot_ms", args.tpot_ms)) if v is not None}
    client = EdgeClient(
        args.server,
        args.draft,
        token=args.token,
        ca_file=args.ca_file,
        controller=args.controller,
        mode=args.mode,
        threads=args.threads,
        slo=SLO(**slo_kw),
        resume_deadline_s=args.resume_deadline,
    )
    try:
        if args.raw or not client.tokenizer.chat_template:
            prompt = prompt_text
        else:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            prompt = [*messages, {"role": "user", "content": prompt_text}]
        kwargs = dict(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=args.stop or None,
        )
        if args.json:
            result = client.generate(prompt, args.max_new_tokens, **kwargs)
            print(json.dumps(result.to_dict(), ensure_ascii=False))
            return 0
        for delta in client.stream(prompt, args.max_new_tokens, **kwargs):
            sys.stdout.write(delta)
            sys.stdout.flush()
        last = client.last_result
        assert last is not None
        sys.stdout.write("\n")
        print(last.stats.summary(), file=sys.stderr)  # stdout holds the text alone (`> out.txt`)
        return 0
    finally:
        client.close()
