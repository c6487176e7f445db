"""Weight-only quantization of the exported graph with onnxruntime's MatMulNBits.

Choices (numbers for the real 0.5B draft in ../shared/MODELS.md and docs/export.md):
  q8   MatMulNBits 8-bit, block 32, accuracy level 4 (int8 compute): ~98 % argmax agreement, ~40 ms/token.
       The default: plain quantize_dynamic is no smaller in practice and loses 6+ points of agreement.
  q4   MatMulNBits 4-bit, block 32, plus 4-bit GatherBlockQuantized embedding: a third of the size, ~91 %.
  none fp32, as exported.
"""

from __future__ import annotations

import logging
from pathlib import Path

from wisp_sdk.bundle import Quantization

QUANT_CHOICES = ("q8", "q4", "none")
DATA_SUFFIX = "_data"  # model.onnx -> model.onnx_data, optimum's naming for external weights
_BLOCK = 32
_ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits: the fast CPU kernel


def quantization_spec(quant: str) -> Quantization:
    if quant == "q8":
        return Quantization(method="matmulnbits", bits=8, block_size=_BLOCK, accuracy_level=_ACCURACY_LEVEL)
    if quant == "q4":
        return Quantization(
            method="matmulnbits", bits=4, block_size=_BLOCK, accuracy_level=_ACCURACY_LEVEL, embedding_bits=4
        )
    if quant == "none":
        return Quantization(method="none")
    raise ValueError(f"unknown quantization {quant!r}; choose from {', '.join(QUANT_CHOICES)}")


def quantize_model(src: Path, dst: Path, quant: str) -> Path:
    """Read `src` (with its external data), quantize, write `dst` + `dst`_data. `dst`'s folder must hold no
    previous data file: onnx appends external data rather than overwriting it."""
    import onnx

    quantization_spec(quant)  # validates the name
    data = dst.with_name(dst.name + DATA_SUFFIX)
    if dst.exists() or data.exists():
        raise FileExistsError(f"{dst} or {data} already exists; quantized models must go to an empty folder")
    model = onnx.load(str(src), load_external_data=True)
    if quant != "none":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        # It logs every node it skips at INFO (the CLI runs with INFO on), and for q4 warns that it raises the IR
        # version to 10 for int4 weights, which is expected and what ORT needs.
        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)

        q4 = quant == "q4"
        # Gather (embedding) blocks quantize only at 4 bits in onnxruntime, hence q8 leaves the embedding fp32.
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=4 if q4 else 8,
            block_size=_BLOCK,
            is_symmetric=False,
            accuracy_level=_ACCURACY_LEVEL,
            op_types_to_quantize=("MatMul", "Gather") if q4 else ("MatMul",),
            quant_axes=(("MatMul", 0), ("Gather", 1)) if q4 else (("MatMul", 0),),
        )
        quantizer.process()
        model = quantizer.model.model
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Always external data: the same layout for every size (protobuf caps a single file at 2 GB).
    onnx.save_model(
        model,
        str(dst),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    data.chmod(0o644)  # onnx creates it 0600; bundles get copied to other users and devices
    return dst


def onnx_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))
