"""The OpenAI-compatible API's shapes, shared by `wisp serve` and `wisp edge serve`: requests, responses, SSE
chunks, errors, and the `Completer` each side implements (the cloud decodes in its engine; the edge drafts
locally and verifies on a server).

Only the fields WISP honours are modelled; other fields an OpenAI client sends are ignored, except those that
would change the answer (`n` > 1, `echo`, `logprobs`, ...), which get a 400 rather than a silently wrong reply.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from wisp_sdk.protocol import ErrorCode
from wisp_sdk.tokenizer import DraftTokenizer

MAX_STOP = 4  # OpenAI's limit on stop strings


class ApiError(Exception):
    """An OpenAI-shaped error: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Protocol error codes (wisp_sdk.protocol.ErrorCode values) in HTTP terms; anything else is a 500.
_STATUS = {"bad_request": 400, "too_large": 400, "unauthorized": 401, "overloaded": 503}


def api_error(code: ErrorCode | str, message: str) -> ApiError:
    """A verifier's refusal (an `Error` frame's code and message) as the OpenAI error a client gets."""
    code = code.value if isinstance(code, ErrorCode) else code
    if code == "too_large":
        return ApiError(400, message, code="context_length_exceeded")
    status = _STATUS.get(code, 500)
    return ApiError(status, message, "invalid_request_error" if status < 500 else "server_error", code=code)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return v

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop or [] if s]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: Literal[False] = False
    logprobs: None = None
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: passed to the chat template as is

    role: str
    content: str | list[dict[str, Any]] | None = None

    def for_template(self) -> dict[str, Any]:
        msg = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):  # content parts: only text ones
            if any(part.get("type") != "text" for part in self.content):
                raise ApiError(400, "only text content parts are supported", param="messages")
            msg["content"] = "".join(str(part.get("text", "")) for part in self.content)
        return msg


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Literal[False] | None = None
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse(kind: type[_Request], body: bytes) -> Any:
    """A request body as `kind`, or an `ApiError` (400) that names the offending field."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where or None) from exc


@dataclass
class GenParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    api_key: str | None = None  # the bearer token that asked (the cloud's per-token session limits)


@dataclass
class Outcome:
    """Filled by `Completer.stream` as it ends: OpenAI's finish reason and the generated token count."""

    finish_reason: str = ""
    completion_tokens: int = 0


def finish_reason(wisp_reason: str) -> str:
    """WISP's reasons (eos, stop, length) in OpenAI's words: EOS and stop strings are both `stop`."""
    return "length" if wisp_reason == "length" else "stop"


class Completer:
    """One side's way to generate: the target's tokenizer (and chat template) and a text stream."""

    def __init__(self, model: str, tokenizer: DraftTokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer

    def default_max_tokens(self, prompt_len: int) -> int:
        """Chat requests without max_tokens: as many as the context allows (the server knows its limit)."""
        return 4096

    async def stream(self, prompt_ids: list[int], params: GenParams, out: Outcome) -> AsyncIterator[str]:
        """Yield text deltas; fill `out` at the end. Raises `ApiError`. Closing it early frees the generation."""
        raise NotImplementedError
        yield ""  # pragma: no cover  (makes this an async generator for type checkers)


def completion_ids(completer: Completer, req: CompletionRequest) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = completer.tokenizer.encode(prompt)
    elif prompt and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)  # type: ignore[arg-type]
    else:
        raise ApiError(400, "prompt must be one string or one list of token ids (batches are not supported)")
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    vocab = completer.tokenizer.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise ApiError(400, f"prompt has token ids outside [0, {vocab})", param="prompt")
    return ids


def chat_ids(completer: Completer, req: ChatRequest) -> list[int]:
    from wisp_sdk.errors import WispError

    messages = [m.for_template() for m in req.messages]
    try:
        text = completer.tokenizer.apply_chat_template(messages)
    except WispError as exc:
        raise ApiError(400, str(exc), param="messages") from exc
    except Exception as exc:  # a template's own error (jinja2 raises many kinds)
        raise ApiError(400, f"chat template failed: {exc}", param="messages") from exc
    return completer.tokenizer.encode(text)


def params_of(
    completer: Completer, req: _Request, prompt_len: int, max_tokens: int | None, api_key: str | None
) -> GenParams:
    return GenParams(
        api_key=api_key,
        max_tokens=max_tokens or completer.default_max_tokens(prompt_len),
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=req.stops,
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Reply:
    """The response (or stream of chunks) of one completion or chat completion."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._head(False), "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None, reason: str | None = None, first: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: {...}` and a blank line (`data: [DONE]` ends the stream)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
