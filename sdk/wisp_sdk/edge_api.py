"""`wisp edge serve`'s generations: the OpenAI routes backed by an `AsyncEdgeClient` (drafting on this device,
verifying on a WISP server). A client that disconnects closes the stream, which closes the server session."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from wisp_sdk.client import AsyncEdgeClient
from wisp_sdk.errors import ServerError, WispError
from wisp_sdk.openai_api import ApiError, Completer, GenParams, Outcome, api_error


class EdgeCompleter(Completer):
    """One generation at a time (the draft model's KV cache is the client's); concurrent requests wait their turn."""

    def __init__(self, client: AsyncEdgeClient, model: str) -> None:
        super().__init__(model, client.tokenizer)
        self.client = client

    async def stream(self, prompt_ids: list[int], params: GenParams, out: Outcome) -> AsyncIterator[str]:
        client = self.client
        gen = client.stream(
            prompt_ids,
            max_new_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            stop=params.stop,
        )
        try:
            async with contextlib.aclosing(gen):  # type: ignore[type-var]
                async for delta in gen:
                    yield delta
        except ServerError as exc:
            raise api_error(exc.code, exc.message) from None
        except WispError as exc:  # the verifier is unreachable or broke the protocol
            raise ApiError(
                502, f"verifier {client.server}: {exc}", "server_error", code="bad_gateway"
            ) from None
        result = client.last_result
        assert result is not None
        out.finish_reason = result.finish_reason
        out.completion_tokens = len(result.token_ids)
