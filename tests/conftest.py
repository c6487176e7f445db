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
