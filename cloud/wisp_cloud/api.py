"""The OpenAI-compatible API of `wisp serve`: server-side decoding (a centralized session opened in-process, no
websocket), and the plain HTTP routes of the serve port (/health, /ready, /metrics).

The engine answers an in-process session exactly as it answers a device: `Opened`, then `Tokens` frames, through
`deliver` to the session's `Peer`. Here the peer is a queue, and the edge SDK's sans-I/O `Session` turns the
frames into text deltas, stop strings and finish reasons, so both sides of the API end generations alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from wisp_sdk.errors import ProtocolError
from wisp_sdk.openai_api import ApiError, Completer, GenParams, Outcome, api_error
from wisp_sdk.openai_http import OpenAIHttp, Plain
from wisp_sdk.protocol import Error, ErrorCode, Opened, SamplingParams, Tokens, decode_server
from wisp_sdk.session import GenerationRequest, Session
from wisp_sdk.tokenizer import DraftTokenizer

from wisp_cloud.engine import Engine
from wisp_cloud.replies import Refusal
from wisp_cloud.sessions import owner_key


class _Inbox:
    """The `Peer` of an in-process session: the engine's frames, decoded, in a queue."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    def send(self, data: str | bytes) -> None:
        try:
            self.queue.put_nowait(decode_server(data))
        except ProtocolError as exc:  # never expected: the engine encodes what it sends
            self.queue.put_nowait(Error(code=ErrorCode.internal, message=str(exc)))


class EngineCompleter(Completer):
    """Generates with the engine's centralized path: the target decodes every token (no draft)."""

    def __init__(self, engine: Engine, model: str, tokenizer: DraftTokenizer, auth: bool) -> None:
        super().__init__(model, tokenizer)
        self.engine = engine
        self.auth = auth

    def default_max_tokens(self, prompt_len: int) -> int:
        return max(1, self.engine.max_context_len - 1 - prompt_len)

    def check(self, prompt_ids: list[int], params: GenParams) -> None:
        """OpenAI's rule: the prompt and max_tokens must fit in the context (one token is left for the cache)."""
        limit = self.engine.max_context_len - 1
        if len(prompt_ids) + params.max_tokens > limit:
            raise ApiError(
                400,
                f"this model's context is {limit} tokens, but {len(prompt_ids)} prompt tokens and max_tokens "
                f"{params.max_tokens} ask for {len(prompt_ids) + params.max_tokens}; lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )

    async def stream(self, prompt_ids: list[int], params: GenParams, out: Outcome) -> AsyncIterator[str]:
        self.check(prompt_ids, params)
        request = GenerationRequest(
            prompt_ids=prompt_ids,
            max_new_tokens=params.max_tokens,
            sampling=SamplingParams(temperature=params.temperature, top_p=params.top_p, seed=params.seed),
            stop=params.stop,
            mode="centralized",
        )
        sess = Session(request, list(self.engine.backend.eos_token_ids), self.tokenizer)
        inbox = _Inbox()
        owner = owner_key(params.api_key if self.auth else None)
        try:
            session = self.engine.open(owner, inbox, sess.open_message())
        except Refusal as ref:
            raise api_error(ref.code, ref.message) from None
        try:
            while not sess.done:
                msg = await inbox.queue.get()
                if isinstance(msg, Opened):
                    yield sess.on_opened(msg)
                elif isinstance(msg, Tokens):
                    yield sess.on_tokens(msg)
                elif isinstance(msg, Error):
                    raise api_error(msg.code, msg.message)
            out.finish_reason = sess.finish_reason
            out.completion_tokens = len(sess.generated)
        finally:
            if self.engine.store.get(session.id) is session:  # done, failed or abandoned: free it now
                self.engine.close_session(session)


class ServeHttp(OpenAIHttp):
    """The serve port's plain HTTP: health checks and metrics for load balancers, the OpenAI routes, and 426 for
    anything else (that port is the websocket's)."""

    def __init__(
        self,
        completer: Completer | None,
        tokens: frozenset[str],
        max_body: int,
        ready: Callable[[], bool],
        metrics: Callable[[], tuple[str, str]],
    ) -> None:
        super().__init__(
            completer,
            tokens,
            max_body,
            unavailable="the OpenAI routes need the target's tokenizer.json, which this server was not given",
        )
        self.ready = ready
        self.metrics = metrics

    def plain_route(self, method: str, path: str) -> Plain | None:
        if path == "/health":
            return Plain(200, "ok\n")
        if path == "/ready":
            return Plain(200, "ready\n") if self.ready() else Plain(503, "not ready\n")
        if path == "/metrics":
            body, content_type = self.metrics()
            return Plain(200, body, content_type)
        return Plain(426, "this port speaks websockets (wisp.v1) and the OpenAI API under /v1\n")

    def check_ready(self) -> None:
        if not self.ready():
            raise ApiError(503, "the server is draining or stopped; retry on another replica", "server_error")
