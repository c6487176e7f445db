"""`wisp export`: an HF causal LM folder (or a known model name) -> a draft bundle for the edge.

The bundle is assembled in a sibling staging folder and moved into place only after the parity check passed, so a
failed or interrupted export never leaves a half bundle, and `--force` replaces an old bundle only on success.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wisp_sdk.bundle import MANIFEST_NAME, DraftManifest, save_manifest, tokenizer_fingerprint
from wisp_sdk.errors import WispError

from wisp_export.hf import quiet_transformers
from wisp_export.progress import bar, phase
from wisp_export.quantize import QUANT_CHOICES, onnx_opset, quantization_spec, quantize_model

log = logging.getLogger(__name__)

# model_type values whose optimum-onnx export has the KV layout the edge runner expects (GQA, [b, kv, t, d]).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ONNX_NAME = "model.onnx"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
CONFIG_FILES = ("config.json", "generation_config.json")
CHAT_TEMPLATE = "chat_template.jinja"
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")


@dataclass
class ExportResult:
    bundle: Path
    manifest: DraftManifest
    parity_table: str


def read_config(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise WispError(f"{model_dir}/config.json is unreadable: {exc}") from None


def check_architecture(config: dict[str, Any], model_dir: Path) -> None:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = ", ".join(config.get("architectures") or []) or "?"
        raise WispError(
            f"{model_dir}: unsupported architecture {model_type!r} ({archs}); "
            f"wisp export supports model_type {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise WispError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise WispError(f"--out {out} is not empty; choose another folder or pass --force to overwrite it")


def make_staging(out: Path, staging: Path) -> None:
    """The empty folder the bundle is written into before it replaces --out."""
    shutil.rmtree(staging, ignore_errors=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as exc:
        raise WispError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None


def check_weights(src: Path, model: str | Path) -> None:
    if not any(p for g in WEIGHT_GLOBS for p in src.glob(g)):
        raise WispError(f"--model {model}: no weight files in {src} (*.safetensors or pytorch_model*.bin)")


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the weight files' bytes, files in name order (what the bundle was made from)."""
    files = sorted({p for g in WEIGHT_GLOBS for p in model_dir.glob(g)}, key=lambda p: p.name)
    if not files:
        raise WispError(f"{model_dir}: no weight files (*.safetensors or pytorch_model*.bin)")
    h = hashlib.sha256()
    with bar(sum(p.stat().st_size for p in files), desc="hash weights", unit="B", leave=False) as pbar:
        for p in files:
            with open(p, "rb") as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
                    pbar.update(len(chunk))
    return "sha256:" + h.hexdigest()


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _tokenizer_eos_id(model_dir: Path) -> int | None:
    """The id of tokenizer_config's eos_token, looked up in tokenizer.json (no transformers needed)."""
    cfg, tj = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    if not (cfg.is_file() and tj.is_file()):
        return None
    eos = json.loads(cfg.read_text()).get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if not isinstance(eos, str):
        return None
    data = json.loads(tj.read_text())
    for tok in data.get("added_tokens", []):
        if tok.get("content") == eos:
            return int(tok["id"])
    vocab = data.get("model", {}).get("vocab")
    return int(vocab[eos]) if isinstance(vocab, dict) and eos in vocab else None


def eos_ids(model_dir: Path, config: dict[str, Any]) -> list[int]:
    """Every id that ends a turn: config, generation config and the tokenizer's eos token.

    They differ in practice: the Qwen2.5 GGUF says eos <|im_end|> in the model but <|endoftext|> in the tokenizer,
    and a draft must stop on both.
    """
    ids = _as_list(config.get("eos_token_id"))
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        ids += _as_list(json.loads(gen.read_text()).get("eos_token_id"))
    tok_eos = _tokenizer_eos_id(model_dir)
    if tok_eos is not None:
        ids.append(tok_eos)
    return sorted(set(ids))


def copy_tokenizer(src: Path, dst: Path) -> Path:
    """Copy tokenizer files verbatim; write tokenizer.json and chat_template.jinja if the source lacks them."""
    for name in (*TOKENIZER_FILES, *CONFIG_FILES, CHAT_TEMPLATE):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if not (dst / "tokenizer.json").is_file():
        # Only a slow tokenizer in the source: let transformers convert it to the fast (tokenizer.json) format.
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(src).save_pretrained(dst)
        if not (dst / "tokenizer.json").is_file():
            raise WispError(f"{src}: could not produce a tokenizer.json (the edge needs a fast tokenizer)")
    if not (dst / CHAT_TEMPLATE).is_file():
        cfg = dst / "tokenizer_config.json"
        template = json.loads(cfg.read_text()).get("chat_template") if cfg.is_file() else None
        if isinstance(template, list):  # named templates: keep the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template:
            (dst / CHAT_TEMPLATE).write_text(template)
        else:
            log.warning("%s has no chat template; the bundle will have none", src)
    return dst / "tokenizer.json"


def export_onnx(model_dir: Path, out_dir: Path) -> Path:
    """optimum-onnx export with a KV cache; returns the path of model.onnx."""
    from optimum.exporters.onnx import main_export

    quiet_transformers()

    # Our own parity check replaces optimum's validation (which would load the model a second time). The tracer's
    # warnings (constant-folded Python bools etc.) are expected for this task and only bury the progress display.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(
            str(model_dir),
            output=out_dir,
            task="text-generation-with-past",
            do_validation=False,
            local_files_only=True,
            library_name="transformers",
        )
    path = out_dir / ONNX_NAME
    if not path.is_file():
        raise WispError(
            f"optimum-onnx wrote no {ONNX_NAME} in {out_dir}: {sorted(p.name for p in out_dir.iterdir())}"
        )
    return path


def build_manifest(
    model_dir: Path, config: dict[str, Any], quant: str, opset: int, fingerprint: str, source: str
) -> DraftManifest:
    heads = int(config["num_attention_heads"])
    return DraftManifest(
        architecture=(config.get("architectures") or [config["model_type"]])[0],
        model_type=config["model_type"],
        vocab_size=int(config["vocab_size"]),
        eos_token_ids=eos_ids(model_dir, config),
        bos_token_id=config.get("bos_token_id"),
        num_layers=int(config["num_hidden_layers"]),
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
        quantization=quantization_spec(quant),
        opset=opset,
        onnx_file=ONNX_NAME,
        source_sha256=weights_sha256(model_dir),
        tokenizer_fingerprint=fingerprint,
        source=source,
    )


def export_bundle(
    model: str | Path, out: str | Path, quant: str = "q8", check_steps: int = 32, force: bool = False
) -> ExportResult:
    from wisp_export.fetch import resolve_model
    from wisp_export.parity import format_table, measure

    if quant not in QUANT_CHOICES:
        raise WispError(f"--quant {quant}: choose one of {', '.join(QUANT_CHOICES)}")
    if check_steps < 0:
        raise WispError("--check-steps must be >= 0")
    out = Path(out).expanduser().absolute()
    check_output(out, force)
    staging = out.with_name(f".{out.name}.partial")
    make_staging(out, staging)  # before any download or model load: an unwritable --out fails at once
    staging.rmdir()
    src = resolve_model(model)
    if (src / MANIFEST_NAME).is_file():  # a common mix-up, named before its config is judged
        raise WispError(
            f"--model {model} is a draft bundle (made by `wisp export`), not an HF model folder; "
            "give the model folder or name it was exported from"
        )
    config = read_config(src)
    check_architecture(config, src)
    check_weights(src, model)

    make_staging(out, staging)
    try:
        # Work next to the output, not in /tmp: an fp32 export of a 1.5B model is ~7 GB.
        with tempfile.TemporaryDirectory(prefix=".wisp-export-", dir=out.parent) as work:
            with phase("export ONNX (optimum-onnx)"):
                raw = export_onnx(src, Path(work))
            with phase(f"quantize ({quant})" if quant != "none" else "write fp32 model"):
                quantize_model(raw, staging / ONNX_NAME, quant)
        fingerprint = tokenizer_fingerprint(copy_tokenizer(src, staging))
        opset = onnx_opset(staging / ONNX_NAME)
        manifest = build_manifest(src, config, quant, opset, fingerprint, source=str(model))
        table = "parity: skipped (--check-steps 0)"
        if check_steps:
            result = measure(src, staging / ONNX_NAME, check_steps, quant)
            table = format_table(result)
            manifest.parity = result.report
            if not result.passed:
                print(table, file=sys.stderr)
                raise WispError(f"broken export, parity failed: {result.reason}; no bundle written")
        save_manifest(staging, manifest)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out, manifest, table)
