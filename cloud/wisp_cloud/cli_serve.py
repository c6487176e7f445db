"""`wisp serve`: load a target model and serve verification over websockets until SIGINT/SIGTERM.

Only argparse at import time: the heavy imports (torch, transformers, websockets server) happen in `run`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wisp_sdk.errors import WispError

from wisp_cloud.backends.factory import native_backend
from wisp_cloud.random_model import add_random_model_args, check_model_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a target model: verify edge drafts in shared batches",
        description="Serve a target model over websockets (wisp.v1). Prints `listening on ws://HOST:PORT` when ready.",
    )
    add_serve_args(p)
    p.set_defaults(func=run)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Every `wisp serve` flag (`wisp cluster` takes them all and hands them to its replicas)."""
    p.add_argument("--target", help="HF model folder, or a known model name (see `wisp models`)")
    add_random_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback needs auth tokens)")
    p.add_argument("--port", type=int, default=8765, help="port; 0 picks a free one")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--backend",
        default="native",
        choices=["native", "sglang"],
        help="model engine (sglang: its own environment, docs/sglang.md)",
    )
    p.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "paged", "hf"],
        help="native backend's engine: paged (paged KV, ragged batches, CUDA graphs) or hf (transformers "
        "dynamic cache); auto = paged on CUDA, hf on CPU",
    )
    p.add_argument(
        "--sglang-sampling",
        default="exact",
        choices=["exact", "refuse"],
        help="sglang backend: exact sampling (full-vocabulary logprobs) or refuse sampling sessions",
    )
    p.add_argument("--sglang-tp", type=int, default=1, help="sglang backend: tensor-parallel GPUs")
    p.add_argument(
        "--sglang-max-total-tokens",
        type=int,
        help="sglang backend: KV pool size in tokens (default: SGLang sizes it from memory; 262144 on CPU)",
    )
    p.add_argument(
        "--policy",
        default="fifo",
        choices=["fifo", "wisp", "sled", "centralized"],
        help="batch policy: wisp (SLO-aware, admission control), sled (static batching), centralized "
        "(continuous batching of server-side decoding), fifo (docs/scheduling.md)",
    )
    p.add_argument(
        "--estimator",
        metavar="FILE",
        help="verify-time estimator from `wisp profile` (default: a built-in prior, refined online)",
    )
    p.add_argument(
        "--profile-on-start",
        action="store_true",
        help="without --estimator: fit the estimator by a quick profile of the backend before serving",
    )
    p.add_argument("--save-estimator", metavar="FILE", help="write the online-refined estimator here on exit")
    p.add_argument(
        "--admission-target",
        type=float,
        default=0.9,
        help="--policy wisp: refuse sessions (overloaded) when predicted SLO attainment falls below this "
        "(0 disables admission control)",
    )
    p.add_argument(
        "--drain-s",
        type=float,
        default=30.0,
        help="on SIGTERM: stop taking sessions and finish the rounds in flight for up to this many seconds, "
        "then close connections with 1001 (default 30; 0: stop at once). SIGINT stops at once",
    )
    p.add_argument("--max-batch", type=int, default=64, help="sessions per forward pass")
    p.add_argument(
        "--prefill-chunk", type=int, default=256, help="context tokens per session per forward pass"
    )
    p.add_argument("--kv-budget-tokens", type=int, default=262_144, help="KV cache budget over all sessions")
    p.add_argument("--session-ttl", type=float, default=600.0, help="seconds before an idle session expires")
    p.add_argument(
        "--auth-tokens", metavar="FILE", help="bearer tokens, one per line (also WISP_AUTH_TOKENS)"
    )
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate: serve wss://")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key for --tls-cert")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1", help="bind address of /metrics")
    p.add_argument("--max-draft-len", type=int, default=32, help="draft tokens per round")
    p.add_argument("--max-context-len", type=int, default=8192, help="prompt + generated tokens per session")
    p.add_argument("--max-frame-bytes", type=int, default=1 << 20, help="largest accepted frame")
    p.add_argument("--max-sessions", type=int, default=4096, help="sessions over all tokens")
    p.add_argument("--max-sessions-per-token", type=int, default=256, help="sessions per auth token")
    p.add_argument("--threads", type=int, help="torch intra-op CPU threads (default: torch's choice)")
    p.add_argument("--debug-fault-token", type=int, help=argparse.SUPPRESS)


def _resolve_target(target: str) -> Path:
    try:
        from wisp_export.fetch import resolve_model
    except ImportError:
        resolve_model = None
    if resolve_model is not None:
        return Path(resolve_model(target))
    path = Path(target).expanduser()
    if not path.exists():
        raise WispError(f"--target {target}: no such folder")
    if not (path / "config.json").is_file():
        raise WispError(f"--target {target}: not an HF model folder (no config.json)")
    return path


def run(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from wisp_cloud.config import ServerConfig, is_loopback, load_auth_tokens

    cfg = ServerConfig(
        host=args.host,
        port=args.port,
        policy=args.policy,
        max_batch=args.max_batch,
        prefill_chunk=args.prefill_chunk,
        kv_budget_tokens=args.kv_budget_tokens,
        session_ttl_s=args.session_ttl,
        auth_tokens=load_auth_tokens(args.auth_tokens),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        max_draft_len=args.max_draft_len,
        max_context_len=args.max_context_len,
        max_frame_bytes=args.max_frame_bytes,
        max_sessions=args.max_sessions,
        max_sessions_per_token=args.max_sessions_per_token,
        admission_target=args.admission_target,
        fault_token=args.debug_fault_token,
    )
    if not 0.0 <= cfg.admission_target <= 1.0:
        raise WispError("--admission-target must be in [0, 1]")
    if args.estimator and not Path(args.estimator).is_file():
        raise WispError(f"--estimator {args.estimator}: no such file")
    for name in ("max_batch", "prefill_chunk", "kv_budget_tokens", "max_draft_len", "max_context_len"):
        if getattr(cfg, name) < 1:
            raise WispError(f"--{name.replace('_', '-')} must be >= 1")
    from wisp_cloud.sched import POLICIES

    if cfg.policy not in POLICIES:
        raise WispError(f"--policy {cfg.policy}: unknown (have: {', '.join(POLICIES)})")
    if not cfg.auth_tokens and not is_loopback(cfg.host):
        raise WispError(
            f"refusing to serve on {cfg.host} without auth tokens; give --auth-tokens FILE or WISP_AUTH_TOKENS"
        )
    check_model_args(args)
    target = _resolve_target(args.target) if args.target else Path(args.random_config)

    import torch

    from wisp_cloud.estimator import VerifyTimeEstimator
    from wisp_cloud.server import WispServer

    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        if args.backend == "sglang":
            from wisp_cloud.backends.sglang import SGLangBackend

            backend = SGLangBackend(
                target,
                device=args.device,
                dtype=args.dtype,
                sampling=args.sglang_sampling,
                tp_size=args.sglang_tp,
                max_total_tokens=args.sglang_max_total_tokens,
                estimator_path=args.estimator,  # the plugin's in-SGLang ordering starts from the profiled weights
            )
        else:
            backend = native_backend(args, target, cfg.kv_budget_tokens)
    except (OSError, ValueError) as exc:
        raise WispError(f"cannot load target {target}: {exc}") from exc

    import logging

    from wisp_cloud.metrics import log_event

    if logging.getLogger().level > logging.DEBUG:  # a balancer's health checks would log two lines a second
        logging.getLogger("websockets.server").setLevel(logging.WARNING)

    log_event(
        logging.getLogger("wisp.serve"),
        "engine",
        backend=getattr(backend, "name", type(backend).__name__),
        device=args.device,
        policy=cfg.policy,
    )
    if args.estimator:
        try:
            estimator = VerifyTimeEstimator.load(args.estimator)
        except (OSError, ValueError, KeyError) as exc:
            raise WispError(f"--estimator {args.estimator}: {exc}") from exc
    elif args.profile_on_start:
        from wisp_cloud.cli_profile import profile_backend

        estimator, report = profile_backend(backend, "quick", reps=2)
        print(
            f"profiled the backend in {report['profile_s']}s: held-out MAPE {report['heldout_mape_pct']}%",
            flush=True,
        )
    else:
        estimator = VerifyTimeEstimator.default()

    async def main() -> None:
        server = WispServer(backend, cfg, estimator=estimator)
        await server.start()
        stop = asyncio.Event()
        drain = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, lambda: (drain.set(), stop.set()))
        print(f"listening on {cfg.scheme}://{cfg.host}:{server.port}", flush=True)
        try:
            await stop.wait()
            if drain.is_set() and args.drain_s > 0:  # SIGTERM: finish the rounds in flight first
                await server.drain(args.drain_s)
        finally:
            await server.stop()

    try:
        asyncio.run(main())
        if args.save_estimator:
            estimator.save(args.save_estimator)
    finally:
        shutdown = getattr(backend, "shutdown", None)
        if shutdown is not None:
            shutdown()
    return 0
