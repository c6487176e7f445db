"""Shared fixtures: tiny models are built once per test session into a temporary folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # the fixtures import torch lazily: SDK-only test modules never load it
    from reference import GreedyReference
    from transformers import PreTrainedModel
    from wisp_cloud.backends.native import NativeBackend
    from ws_client import Drafter

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


# ---- the tiny pair in torch, for the server tests and the references they compare with ----


@pytest.fixture(scope="module")
def backend(tiny_target) -> NativeBackend:
    """The native backend on the tiny target, one per module: it holds KV state across a module's servers."""
    from wisp_cloud.backends.native import NativeBackend

    return NativeBackend(tiny_target)


@pytest.fixture(scope="module")
def drafter(tiny_draft) -> Drafter:
    """The protocol-level test client's HF drafter on the tiny draft (memoizes logits per context)."""
    from ws_client import Drafter

    return Drafter(tiny_draft)


@pytest.fixture(scope="session")
def target_model(tiny_target) -> PreTrainedModel:
    """The tiny target in transformers, shared by the session: tests only read it (generate, forward)."""
    from reference import load_target

    return load_target(tiny_target)


@pytest.fixture(scope="session")
def reference(target_model) -> GreedyReference:
    """`reference(prompt_ids, n)`: the target's greedy n tokens (transformers generate), memoized."""
    from reference import GreedyReference

    return GreedyReference(target_model)
