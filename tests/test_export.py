"""`wisp export` on the tiny Qwen2 and Llama models: bundle contents, manifest, parity, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from wisp_export.export import export_bundle
from wisp_export.onnx_lm import OnnxCausalLM
from wisp_export.parity import judge
from wisp_sdk.bundle import MANIFEST_NAME, ParityReport, load_manifest, tokenizer_fingerprint
from wisp_sdk.cli import main

STEPS = 16


@pytest.fixture(scope="module")
def bundles(tiny_target, tiny_llama, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """One export per (arch, quant); exporting is the slow part, so each is made once for the module."""
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for arch, src in (("qwen2", tiny_target), ("llama", tiny_llama)):
        for quant in ("none", "q8"):
            out[arch, quant] = export_bundle(
                src, root / f"{arch}-{quant}", quant=quant, check_steps=STEPS
            ).bundle
    return out


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("quant", ["none", "q8"])
def test_bundle_contents_and_manifest(bundles, tiny_target, tiny_llama, arch, quant):
    src = tiny_target if arch == "qwen2" else tiny_llama
    bundle = bundles[arch, quant]
    for name in (
        "model.onnx",
        "model.onnx_data",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ):
        assert (bundle / name).is_file(), name
    m = load_manifest(bundle)
    config = json.loads((src / "config.json").read_text())
    assert m.format_version == 1
    assert m.model_type == arch and m.architecture == config["architectures"][0]
    assert m.vocab_size == config["vocab_size"]
    assert config["eos_token_id"] in m.eos_token_ids
    assert (m.num_layers, m.num_kv_heads, m.head_dim) == (2, 2, 16)
    assert m.opset >= 17
    assert m.source_sha256.startswith("sha256:") and len(m.source_sha256) == 71
    assert m.tokenizer_fingerprint == tokenizer_fingerprint(src / "tokenizer.json")
    assert (bundle / "chat_template.jinja").read_text() == (src / "chat_template.jinja").read_text()
    if quant == "none":
        assert m.quantization.method == "none"
    else:
        q = m.quantization
        assert (q.method, q.bits, q.block_size, q.accuracy_level) == ("matmulnbits", 8, 32, 4)
    assert m.parity is not None and m.parity.steps == STEPS
    if quant == "none":
        assert m.parity.max_abs_logit_diff <= 1e-3
        assert m.parity.argmax_agreement == 1.0
    else:
        assert m.parity.argmax_agreement >= 0.9
    assert not list(bundle.parent.glob(".*partial")), "no staging folder is left behind"


def test_q8_shrinks_the_weights(bundles):
    fp32 = (bundles["qwen2", "none"] / "model.onnx_data").stat().st_size
    q8 = (bundles["qwen2", "q8"] / "model.onnx_data").stat().st_size
    assert q8 < 0.6 * fp32


def test_onnx_greedy_matches_pytorch(bundles, tiny_target):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_target)
    ids = tok("def fibonacci(n):", add_special_tokens=False)["input_ids"]
    pt = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32)
    with torch.no_grad():
        ref = pt.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None)
    ref_new = ref[0, len(ids) :].tolist()
    lm = OnnxCausalLM(bundles["qwen2", "none"] / "model.onnx")
    assert lm.greedy(ids, 20) == ref_new
    # The cache carries over between calls: prefill in two pieces gives the same logits as in one.
    lm.reset()
    whole = lm.forward(ids)[-1]
    lm.reset()
    lm.forward(ids[:2])
    split = lm.forward(ids[2:])[-1]
    np.testing.assert_allclose(whole, split, atol=1e-4)


def test_cli_prints_table_and_bundle_path(tiny_llama, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert (
        main(
            ["export", "--model", str(tiny_llama), "--out", str(out), "--quant", "none", "--check-steps", "4"]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert "argmax agreement" in stdout and "PASS" in stdout
    assert stdout.strip().splitlines()[-1] == str(out)
    assert (out / MANIFEST_NAME).is_file()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err
    return err


def test_missing_model_path_is_one_line(tmp_path, capsys):
    rc = main(["export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "b")])
    assert rc == 2
    assert "no such folder" in _one_line_error(capsys)


def test_unsupported_architecture_is_one_line(tmp_path, capsys):
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    rc = main(["export", "--model", str(src), "--out", str(tmp_path / "b")])
    assert rc == 2
    err = _one_line_error(capsys)
    assert "unsupported architecture 'bert'" in err and "qwen2" in err
    assert not (tmp_path / "b").exists()


def test_non_empty_output_needs_force(tiny_llama, tmp_path, capsys):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc = main(["export", "--model", str(tiny_llama), "--out", str(out)])
    assert rc == 2
    err = _one_line_error(capsys)
    assert "not empty" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "precious", "never silently overwritten"
    rc = main(
        [
            "export",
            "--model",
            str(tiny_llama),
            "--out",
            str(out),
            "--quant",
            "none",
            "--check-steps",
            "2",
            "--force",
        ]
    )
    assert rc == 0
    assert not (out / "keep.txt").exists() and (out / MANIFEST_NAME).is_file()


def test_output_that_is_a_file_is_refused(tiny_llama, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    assert main(["export", "--model", str(tiny_llama), "--out", str(out)]) == 2
    assert "is a file" in _one_line_error(capsys)


def test_broken_exports_fail_parity():
    def report(diff: float, agree: float) -> ParityReport:
        return ParityReport(steps=8, max_abs_logit_diff=diff, argmax_agreement=agree)

    assert judge(report(2e-5, 1.0), "none") == (True, "")
    ok, reason = judge(report(0.01, 1.0), "none")
    assert not ok and "max logit diff" in reason
    assert judge(report(0.4, 0.95), "q8")[0]
    assert not judge(report(0.4, 0.5), "q8")[0]
    assert not judge(report(float("inf"), 1.0), "q8")[0]


def test_failed_parity_leaves_no_bundle(tiny_llama, tmp_path, monkeypatch, capsys):
    import wisp_export.parity as parity

    monkeypatch.setitem(parity.MIN_AGREEMENT, "none", 1.01)  # impossible: simulates a broken export
    out = tmp_path / "b"
    rc = main(
        ["export", "--model", str(tiny_llama), "--out", str(out), "--quant", "none", "--check-steps", "2"]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "error: broken export, parity failed" in err and "FAIL" in err
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
