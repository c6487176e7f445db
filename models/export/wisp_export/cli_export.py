"""`wisp export`: make a draft bundle. Light at import: torch/optimum load only inside the handler."""

from __future__ import annotations

import argparse

from wisp_export.quantize import QUANT_CHOICES  # light: onnx/onnxruntime are imported inside its functions


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a draft model to an ONNX bundle for the edge",
        description=(
            "Export an HF causal LM (Qwen2/Qwen3/Llama/Mistral family) to an ONNX draft bundle with a KV cache, "
            "quantize it, and check parity against PyTorch."
        ),
    )
    p.add_argument(
        "--model", required=True, metavar="PATH_OR_NAME", help="HF model folder or known model name"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="bundle folder (must be empty unless --force)")
    p.add_argument(
        "--quant",
        choices=QUANT_CHOICES,
        default="q8",
        help="q8: MatMulNBits 8-bit block 32 (default); q4: 4-bit + 4-bit embedding; none: fp32",
    )
    p.add_argument(
        "--check-steps",
        type=int,
        default=32,
        metavar="N",
        help="cached decode steps compared against PyTorch (default 32; 0 skips the parity check)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace a non-empty --out folder (only once export succeeds)"
    )
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from wisp_export.export import export_bundle

    result = export_bundle(
        args.model, args.out, quant=args.quant, check_steps=args.check_steps, force=args.force
    )
    print(result.parity_table)
    print(result.bundle)
    return 0
