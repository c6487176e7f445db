"""The Kotlin client's shared test vectors must be what wisp_sdk produces today.

android_demo/tools/make_vectors.py writes android_demo/core/src/test/resources/vectors.json from wisp_sdk (wire
frames, predictor outputs, controller decisions, sparse q); the Kotlin unit tests decode, encode and replay every
entry. If this test fails, the Python side changed: rerun the script, commit the file, and run android_demo/ci.sh.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "android_demo" / "tools" / "make_vectors.py"
VECTORS = ROOT / "android_demo" / "core" / "src" / "test" / "resources" / "vectors.json"


def _load_script():
    spec = importlib.util.spec_from_file_location("android_make_vectors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_vectors_match_wisp_sdk():
    make_vectors = _load_script()
    fresh = json.loads(make_vectors.render())
    committed = json.loads(VECTORS.read_text())
    # Floats within 1e-12 relative (numpy patch releases move libm results in the last bit); everything else exact.
    diffs = make_vectors.differences(committed, fresh)
    assert not diffs, (
        f"android_demo vectors are stale ({len(diffs)} differences, first: {diffs[:3]}): "
        "run `.venv/bin/python android_demo/tools/make_vectors.py`"
    )


def test_vector_comparison_is_exact_except_floats():
    """The tolerance covers a last-bit float move and nothing else: ints, strings and lengths stay exact."""
    diff = _load_script().differences
    p = 0.7310585786300049
    assert diff({"p": p}, {"p": p + 2e-16}) == []  # a last-bit move
    assert diff({"p": p}, {"p": p * (1 + 1e-9)})  # a real change
    assert diff({"n": 3}, {"n": 4}) and diff({"hex": "00ff"}, {"hex": "00fe"})
    assert diff({"ids": [1, 2]}, {"ids": [1, 2, 3]}) and diff({"a": 1}, {"b": 1})
    assert diff({"done": True}, {"done": 1})


def test_vectors_cover_every_message_type():
    data = json.loads(VECTORS.read_text())
    types = {v["fields"]["type"] for v in data["json"]}
    assert types == {
        "hello",
        "open",
        "resume",
        "close",
        "welcome",
        "opened",
        "resumed",
        "tokens",
        "switch",
        "closed",
        "error",
    }
    assert data["round"] and data["verdict"] and data["invalid"]
    assert any(v["fields"]["q_ids"] for v in data["round"])
    assert any(v["fields"]["done"] for v in data["verdict"])
    assert any(v["fields"]["centralize"] and v["fields"]["unverified"] for v in data["verdict"])


def test_vectors_cover_every_field_of_the_schema():
    """A message or field added to wisp_sdk.protocol needs a vector, so the Kotlin tests see it."""
    from wisp_sdk.protocol import json_schema

    schema = json_schema()
    data = json.loads(VECTORS.read_text())
    seen: dict[str, set[str]] = {}
    for v in data["json"]:
        seen.setdefault(v["fields"]["type"], set()).update(v["fields"])
    for side in ("client", "server"):
        defs = schema[side]["$defs"]
        for type_name, ref in schema[side]["discriminator"]["mapping"].items():
            props = set(defs[ref.rsplit("/", 1)[1]]["properties"])
            assert type_name in seen, f"no vector for {side} message {type_name!r}"
            assert props <= seen[type_name], (
                f"{type_name}: fields without a vector: {props - seen[type_name]}"
            )
    for kind in ("round", "verdict"):
        props = set(schema[kind]["properties"])
        covered = set().union(*(v["fields"] for v in data[kind]))
        assert props <= covered, f"{kind}: fields without a vector: {props - covered}"
