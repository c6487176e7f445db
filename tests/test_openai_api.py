"""The OpenAI-compatible API, spoken to by the official `openai` package: `wisp serve` (server-side decoding on
the websocket's port) and `wisp edge serve` (drafting here, verifying on that server). Both run as the real CLI in
subprocesses over loopback; with temperature 0 both must return the target's greedy text (HF `generate`)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import openai
import pytest
from cli_process import EdgeProcess, ServerProcess
from metrics_scrape import scrape_metrics, wait_for_metric
from wisp_sdk.tokenizer import DraftTokenizer

KEY = "sk-wisp-test"
PROMPT = "def fibonacci(n):\n"
CHAT = [{"role": "user", "content": "Write a function that returns the sum of a list of numbers."}]


@pytest.fixture(scope="module")
def server(tiny_target, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(KEY + "\n")
    srv = ServerProcess(tiny_target, 0, "--threads", "1", "--auth-tokens", str(tokens))
    srv.base = f"http://127.0.0.1:{srv.port}"
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def edge(server, tiny_bundle):
    e = EdgeProcess(server.url, tiny_bundle, "--api-key", KEY, token=KEY)
    yield e
    e.stop()


@pytest.fixture(scope="module")
def tok(tiny_target):
    return DraftTokenizer(tiny_target)


def _client(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(params=["serve", "edge"])
def base(request, server, edge) -> str:
    return server.base if request.param == "serve" else edge.base


def _model(base: str) -> str:
    return _client(base).models.list().data[0].id


def test_models_lists_one_model(server, edge):
    assert [m.id for m in _client(server.base).models.list().data] == ["target-qwen2"]
    assert [m.id for m in _client(edge.base).models.list().data] == ["bundle-draft"]


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_completion_is_the_targets(base, stream, tok, reference):
    ids = tok.encode(PROMPT)
    ref = reference(ids, 16)
    c = _client(base)
    args = dict(model=_model(base), prompt=PROMPT, max_tokens=16, temperature=0)
    if stream:
        chunks = list(c.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
        assert reasons[-1] in ("length", "stop") and not any(reasons[:-1])
        usage = chunks[-1].usage
        assert len(chunks) > 3  # streamed token by token, not in one piece
    else:
        res = c.completions.create(**args)
        text, usage = res.choices[0].text, res.usage
        assert res.choices[0].finish_reason == ("length" if len(ref) == 16 else "stop")
    assert text == tok.decode(ref)
    assert usage.prompt_tokens == len(ids) and usage.completion_tokens == len(ref)
    assert usage.total_tokens == len(ids) + len(ref)


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_chat_uses_the_targets_template(base, stream, tok, reference):
    ids = tok.encode(tok.apply_chat_template(CHAT))
    ref = reference(ids, 12)
    c = _client(base)
    args = dict(model=_model(base), messages=CHAT, max_tokens=12, temperature=0)
    if stream:
        chunks = list(c.chat.completions.create(**args, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    else:
        res = c.chat.completions.create(**args)
        assert res.choices[0].message.role == "assistant"
        text = res.choices[0].message.content
        assert res.usage.prompt_tokens == len(ids)
    assert text == tok.decode(ref)


def test_stop_strings_cut_the_text(base):
    c = _client(base)
    model = _model(base)
    full = c.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    assert len(full) > 6
    stop = full[3:6]
    res = c.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "\x00"])
    assert res.choices[0].text == full[: full.index(stop)] and res.choices[0].finish_reason == "stop"
    streamed = c.completions.create(
        model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed) == full[: full.index(stop)]


def test_seed_makes_sampling_repeatable(server):
    c = _client(server.base)
    args = dict(model="target-qwen2", prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9)
    a = c.completions.create(**args, seed=7).choices[0].text
    b = c.completions.create(**args, seed=7).choices[0].text
    others = {c.completions.create(**args, seed=s).choices[0].text for s in (1, 2, 3)}
    assert a == b and others != {a}


def _post(url: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_mistakes_get_openai_errors(base):
    c = _client(base)
    model = _model(base)
    status, body = _post(base + "/v1/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError) as err:
        c.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=4)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        _client(base, key="wrong").completions.create(model=model, prompt=PROMPT, max_tokens=4)
    status, body = _post(base + "/v1/completions", b"{}", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model=model, prompt=PROMPT, max_tokens=0)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=model, messages=CHAT, n=2)
    status, body = _post(base + "/v1/nowhere", b"{}")
    assert status == 404 and "error" in body
    status, body = _post(base + "/v1/completions", b" " * (2 << 20))
    assert status == 413 and "request body over" in body["error"]["message"]
    try:
        urllib.request.urlopen(
            urllib.request.Request(base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}),
            timeout=10,
        )
        raise AssertionError("expected 405")
    except urllib.error.HTTPError as exc:
        assert exc.code == 405 and json.loads(exc.read())["error"]["code"] == "method_not_allowed"


def test_serve_refuses_max_tokens_past_the_context(server):
    with pytest.raises(openai.BadRequestError) as err:
        _client(server.base).completions.create(model="target-qwen2", prompt=PROMPT, max_tokens=100_000)
    assert err.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("side", ["serve", "edge"])
def test_client_leaving_mid_stream_frees_the_server(side, server, edge):
    import http.client
    from urllib.parse import urlparse

    base = server.base if side == "serve" else edge.base
    assert wait_for_metric(server.port, "wisp_sessions", 0, 5.0) == 0
    body = {"model": _model(base), "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps(body),
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type") == "text/event-stream"
    events = 0
    while events < 3:
        events += r.readline().startswith(b"data: ")
    assert scrape_metrics(server.port)["wisp_sessions"] == 1  # still generating
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    assert wait_for_metric(server.port, "wisp_sessions", 0, 1.0) == 0
    # and the next generation runs at once
    t0 = time.monotonic()
    _client(base).completions.create(model=_model(base), prompt=PROMPT, max_tokens=4, temperature=0)
    assert time.monotonic() - t0 < 5.0


def test_health_and_websocket_still_share_the_port(server):
    assert urllib.request.urlopen(server.base + "/health", timeout=5).read() == b"ok\n"
    try:
        urllib.request.urlopen(server.base + "/", timeout=5)
        raise AssertionError("expected 426")
    except urllib.error.HTTPError as exc:
        assert exc.code == 426
