"""`wisp edge serve`: a local OpenAI-compatible endpoint that drafts on this device and verifies on a WISP server.

An app written for the `openai` client uses WISP by changing only its base URL (docs/http.md).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from wisp_sdk.argtypes import number


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    edge = subparsers.add_parser(
        "edge",
        help="edge-side services (an OpenAI-compatible endpoint backed by the edge SDK)",
        description="Edge-side services.",
    )
    sub = edge.add_subparsers(dest="edge_command", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "serve",
        help="serve the OpenAI API locally: draft here, verify on a WISP server",
        description="Serve /v1/models, /v1/completions and /v1/chat/completions on HOST:PORT, generating with "
        "the draft bundle here and a WISP server's verification. Prints `listening on http://HOST:PORT` "
        "when ready.",
    )
    p.add_argument("--server", required=True, help="verifier URL, e.g. ws://127.0.0.1:8765")
    p.add_argument(
        "--draft", required=True, metavar="BUNDLE", help="draft bundle folder made by `wisp export`"
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback needs --api-key)")
    p.add_argument(
        "--port", type=number(int, min=0, max=65535), default=8000, help="port; 0 picks a free one"
    )
    p.add_argument("--model-name", help="the model id clients ask for (default: the bundle folder's name)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("WISP_EDGE_API_KEY"),
        help="bearer token local clients must send (default: $WISP_EDGE_API_KEY; none: no auth)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("WISP_TOKEN"),
        help="the verifier's bearer token (default: $WISP_TOKEN)",
    )
    p.add_argument(
        "--ca-file", help="CA certificate (PEM) to verify a wss:// server with (default: the system's)"
    )
    p.add_argument("--controller", default="wisp", help="wisp | wisp+ahead | wisp+cap | wisp+tree | fixed:K")
    p.add_argument(
        "--threads", type=number(int, min=1), default=None, help="ONNX Runtime threads for the draft"
    )
    p.set_defaults(func=run)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from wisp_sdk.client import AsyncEdgeClient
    from wisp_sdk.controllers import make_controller
    from wisp_sdk.edge_api import EdgeCompleter
    from wisp_sdk.errors import WispError
    from wisp_sdk.openai_http import OpenAIHttp

    if not args.api_key and not _loopback(args.host):
        raise WispError(f"refusing to serve on {args.host} without --api-key; give one, or bind 127.0.0.1")
    if not Path(args.draft).is_dir():
        raise WispError(f"--draft {args.draft}: no such folder")
    try:
        make_controller(args.controller)
    except ValueError as exc:
        raise WispError(str(exc)) from exc

    async def main() -> None:
        client = AsyncEdgeClient(
            args.server,
            args.draft,
            token=args.token,
            ca_file=args.ca_file,
            controller=args.controller,
            threads=args.threads,
        )
        try:
            await client.connect()  # a wrong URL, token or bundle fails here, before we listen
            # the draft's first (slow) run and its prefill rate, before the first request: the rate decides the
            # start_on_server offer from the first generation on
            await client.warm_up()
            model = args.model_name or Path(args.draft).resolve().name
            api = OpenAIHttp(
                EdgeCompleter(client, model), frozenset([args.api_key]) if args.api_key else frozenset()
            )
            try:
                server = await api.serve(args.host, args.port)
            except OSError as exc:
                raise WispError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
            port = server.sockets[0].getsockname()[1]
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            print(f"listening on http://{args.host}:{port}", flush=True)
            print(f"model id: {model}; verifying on {args.server}", file=sys.stderr, flush=True)
            await stop.wait()
            server.close()
            api.close_connections()
            await server.wait_closed()
        finally:
            await client.aclose()

    asyncio.run(main())
    return 0
