"""Draft bundles: the folder `wisp export` writes and the edge loads.

A bundle holds `model.onnx` (+ external data), the tokenizer files, the chat template and `wisp-draft.json`
(the manifest below). The tokenizer fingerprint is how the server checks that draft and target speak the same
token ids: a hash of the vocabulary, merges and added tokens, not of incidental JSON formatting.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from wisp_sdk.errors import WispError

MANIFEST_NAME = "wisp-draft.json"
BUNDLE_FORMAT_VERSION = 1


class ParityReport(BaseModel):
    """ONNX vs PyTorch over `steps` cached decode steps on a fixed prompt."""

    steps: int
    max_abs_logit_diff: float
    argmax_agreement: float
    prompt: str = ""
    mean_abs_logit_diff: float | None = None
    greedy_prefix: int | None = None  # leading compared positions (of steps + 1) whose argmaxes agree


class Quantization(BaseModel):
    method: str = "none"  # none | matmulnbits | ...
    bits: int | None = None
    block_size: int | None = None
    accuracy_level: int | None = None
    embedding_bits: int | None = None


class DraftManifest(BaseModel):
    format_version: int = BUNDLE_FORMAT_VERSION
    architecture: str  # e.g. "Qwen2ForCausalLM"
    model_type: str  # e.g. "qwen2"
    vocab_size: int
    eos_token_ids: list[int]
    bos_token_id: int | None = None
    num_layers: int
    num_kv_heads: int
    head_dim: int
    quantization: Quantization = Field(default_factory=Quantization)
    opset: int
    onnx_file: str = "model.onnx"
    source_sha256: str  # sha256 over the source weight files, sorted by name
    tokenizer_fingerprint: str
    parity: ParityReport | None = None
    # Filled by `wisp calibrate`: the rejection predictor's parameters (see wisp_sdk.controllers).
    predictor: dict[str, Any] | None = None
    source: str = ""


def tokenizer_fingerprint(tokenizer_json: str | Path | dict[str, Any]) -> str:
    """sha256 of the token->id map, merges and added tokens of a HF `tokenizer.json`."""
    data = (
        tokenizer_json if isinstance(tokenizer_json, dict) else json.loads(Path(tokenizer_json).read_text())
    )
    model = data.get("model", {})
    vocab = model.get("vocab", {})
    items = sorted(vocab.items(), key=lambda kv: kv[1]) if isinstance(vocab, dict) else list(vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", []) or []]
    added = sorted((t["id"], t["content"]) for t in data.get("added_tokens", []))
    canonical = json.dumps({"vocab": items, "merges": merges, "added": added}, ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def load_manifest(bundle_dir: str | Path) -> DraftManifest:
    if not Path(bundle_dir).is_dir():
        raise WispError(f"draft bundle {bundle_dir}: no such folder")
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise WispError(
            f"{bundle_dir} is not a draft bundle (no {MANIFEST_NAME}); make one with `wisp export`"
        )
    try:
        manifest = DraftManifest.model_validate_json(path.read_text())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise WispError(
            f"{path} is corrupt ({where + ': ' if where else ''}{first['msg']}); export the bundle again "
            "with `wisp export`"
        ) from exc
    if manifest.format_version > BUNDLE_FORMAT_VERSION:
        raise WispError(
            f"bundle format {manifest.format_version} is newer than this SDK supports ({BUNDLE_FORMAT_VERSION})"
        )
    return manifest


def save_manifest(bundle_dir: str | Path, manifest: DraftManifest) -> Path:
    path = Path(bundle_dir) / MANIFEST_NAME
    path.write_text(manifest.model_dump_json(indent=2) + "\n")
    return path
