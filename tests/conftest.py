"""Shared fixtures: tiny models are built once per test session into a temporary folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Tests must never reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_target(tiny_dir) -> Path:
    from tiny_models import build_tiny_model

    return build_tiny_model(tiny_dir / "target-qwen2", arch="qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_draft(tiny_dir, tiny_target) -> Path:
    from tiny_models import build_tiny_model

    return build_tiny_model(tiny_dir / "draft-qwen2", seed=1, perturb_from=tiny_target)


@pytest.fixture(scope="session")
def tiny_llama(tiny_dir) -> Path:
    from tiny_models import build_tiny_model

    return build_tiny_model(tiny_dir / "target-llama", arch="llama", seed=2)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_dir, tiny_draft) -> Path:
    """`tiny_draft` as a draft bundle (fp32 ONNX + tokenizer + chat template + wisp-draft.json)."""
    out = tiny_dir / "bundle-draft"
    try:
        from wisp_export.export import export_bundle
    except ImportError:  # the exporter is not there: build the bundle with optimum directly
        export_bundle = None
    if export_bundle is not None:
        export_bundle(tiny_draft, out, quant="none", check_steps=0, force=True)
        return out
    import json
    import shutil

    from optimum.exporters.onnx import main_export
    from wisp_sdk.bundle import DraftManifest, save_manifest, tokenizer_fingerprint

    main_export(str(tiny_draft), output=out, task="text-generation-with-past", do_validation=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_draft / name).is_file():
            shutil.copy2(tiny_draft / name, out / name)
    cfg = json.loads((tiny_draft / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    save_manifest(
        out,
        DraftManifest(
            architecture=cfg["architectures"][0],
            model_type=cfg["model_type"],
            vocab_size=cfg["vocab_size"],
            eos_token_ids=[cfg["eos_token_id"]],
            bos_token_id=cfg.get("bos_token_id"),
            num_layers=cfg["num_hidden_layers"],
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg["hidden_size"] // heads,
            opset=18,
            source_sha256="",
            tokenizer_fingerprint=tokenizer_fingerprint(out / "tokenizer.json"),
        ),
    )
    return out


@pytest.fixture(scope="session")
def real_q8_bundle(tmp_path_factory):
    """The real 0.5B draft, fetched and exported q8 once per test session (real-model tests share it)."""
    from wisp_export.export import export_bundle
    from wisp_export.fetch import fetch_model

    name = "qwen2.5-coder-0.5b-instruct"
    src = fetch_model(name)
    result = export_bundle(name, tmp_path_factory.mktemp("real") / "bundle", quant="q8", check_steps=32)
    print(result.parity_table)
    return src, result
