"""`wisp serve`: load a target model and serve verification over websockets until SIGINT/SIGTERM.

Only argparse at import time: the heavy imports (torch, transformers, websockets server) happen in `run`.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from wisp_sdk.argtypes import number
from wisp_sdk.errors import WispError

from wisp_cloud.backends.base import Backend
from wisp_cloud.backends.factory import capture_startup_graphs, check_device, device_arg, native_backend
from wisp_cloud.config import ARM_FLAGS, ServerConfig, parse_tenant_weight
from wisp_cloud.host_sampler import HostSampler
from wisp_cloud.logs import logs_off_loop, say
from wisp_cloud.random_model import add_random_model_args, check_model_args

if TYPE_CHECKING:
    from wisp_cloud.estimator import VerifyTimeEstimator


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a target model: verify edge drafts in shared batches",
        description="Serve a target model over websockets (wisp.v1), and the OpenAI-compatible API (/v1, docs/http.md) "
        "on the same port. Prints `listening on ws://HOST:PORT` when ready.",
    )
    add_serve_args(p)
    p.set_defaults(func=run)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Every `wisp serve` flag (`wisp cluster` takes them all and hands them to its replicas)."""
    p.add_argument("--target", help="HF model folder, or a known model name (see `wisp models`)")
    add_random_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback needs auth tokens)")
    p.add_argument("--port", type=int, default=8765, help="port; 0 picks a free one")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--backend",
        default="native",
        choices=["native", "sglang", "fake"],
        help="model engine (sglang: its own environment, docs/sglang.md; fake: no model, the deterministic "
        "target of the tests, for host-path and soak benchmarks: give no --target)",
    )
    p.add_argument(
        "--fake-step-ms",
        type=float,
        default=5.0,
        help="--backend fake: each forward pass sleeps this long (GIL released, like a GPU pass)",
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
        default="sparse",
        choices=["sparse", "full", "exact", "refuse"],
        help="sglang backend: exact sampling from p at the draft's support plus SGLang's own draws (sparse, "
        "default), exact sampling from full-vocabulary logprobs (full; `exact` is its old name), or refuse "
        "sampling sessions",
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
        "--tenant-weight",
        action="append",
        default=[],
        type=parse_tenant_weight,
        metavar="TENANT=W",
        help="weighted fair share of the verifier for a tenant (repeatable): TENANT is the id the server logs "
        "at Hello (owner=...; 16 hex digits of the token's SHA-256) or 'anon'; W > 0; others weigh 1",
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
    p.add_argument(
        "--max-siblings",
        type=int,
        default=8,
        help="sibling tokens a round may carry (token trees: an alternative per draft position; 0: chains only)",
    )
    p.add_argument("--max-context-len", type=int, default=8192, help="prompt + generated tokens per session")
    p.add_argument(
        "--graph-warmup-s",
        type=float,
        default=180.0,
        help="paged engine on CUDA: seconds to spend at start-up capturing the CUDA graphs of every decode and "
        "verify bucket (--max-batch, --max-draft-len, --max-context-len), so serving never runs a shape eagerly "
        "or compiles mid-serving; 0: capture on a shape's second sight only",
    )
    p.add_argument("--max-frame-bytes", type=int, default=1 << 20, help="largest accepted frame")
    p.add_argument("--max-sessions", type=int, default=4096, help="sessions over all tokens")
    p.add_argument("--max-sessions-per-token", type=int, default=256, help="sessions per auth token")
    p.add_argument(
        "--max-connections",
        type=number(int, min=1),
        default=16384,
        help="connections at once, websocket and HTTP (past it: close 1013 / HTTP 503)",
    )
    p.add_argument(
        "--max-connections-per-ip",
        type=number(int, min=1),
        default=4096,
        help="connections from one client address (a websocket through a --trusted-proxy: the forwarded one)",
    )
    p.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="ADDR",
        help="a balancer's address (repeatable): for websockets from it, the client is the last "
        "X-Forwarded-For address (HAProxy `option forwardfor`; `wisp cluster` sets both)",
    )
    p.add_argument("--threads", type=int, help="torch intra-op CPU threads (default: torch's choice)")
    p.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="server log lines: text (`time LEVEL logger: event k=v`) or json (one object per line; "
        "client-supplied values are JSON strings)",
    )
    p.add_argument(
        "--no-hybrid",
        action="store_true",
        help="--policy wisp: never move a session to server-side decoding (the load-adaptive hybrid is on by "
        "default; docs/scheduling.md)",
    )
    p.add_argument(
        "--no-regime",
        action="store_true",
        help="--policy wisp: never move the whole fleet to server-side decoding, even where the estimator says "
        "decoding serves more sessions at the SLO than speculation, and take no `start_on_server` offer (the regime "
        "is on by default; docs/scheduling.md §12)",
    )
    p.add_argument(
        "--no-start-on-server",
        action="store_true",
        help="--policy wisp: decline devices' start_on_server offers (with the regime they are taken: the server "
        "decodes a session's first tokens while its draft prefills the prompt; docs/scheduling.md §12)",
    )
    p.add_argument(
        "--draft-cap",
        action="store_true",
        help="--policy wisp: with the regime, under load, verdicts cap the next round's draft at the draft length "
        "that serves the most sessions at their SLO (off by default: it cost the 7B / Jetson row on an H200; "
        "docs/scheduling.md §13)",
    )
    p.add_argument(
        "--decode-all",
        action="store_true",
        help="--policy wisp, benchmarks: the regime decodes every session from the start and never decides "
        "(WISP's decode path beside centralized serving's)",
    )
    p.add_argument(
        "--no-probes",
        action="store_true",
        help="--policy wisp, benchmarks: no session opens as a regime probe (the decode path without probes' "
        "rounds; the regime then learns nothing new while it decodes)",
    )
    p.add_argument(
        "--no-truncate",
        action="store_true",
        help="--policy wisp: verify every draft token, even a tail whose survival does not pay the verify price",
    )
    p.add_argument(
        "--no-fill",
        action="store_true",
        help="--policy wisp: do not fill the weight read (decodes together, a small batch waiting for announced "
        "rounds; docs/scheduling.md §10)",
    )
    p.add_argument(
        "--refuse",
        action="store_true",
        help="--policy wisp: leave a round or decode out of a batch when joining would push a member past its "
        "deadline (prompt pieces are always checked; off by default, docs/scheduling.md)",
    )
    p.add_argument(
        "--align",
        action="store_true",
        help="--policy wisp: verdicts carry a launch hint (launch_in_ms) so that devices align their rounds with "
        "the next step (off by default: not measured on a GPU; docs/scheduling.md §11)",
    )
    p.add_argument(
        "--model-name",
        help="the model id of the OpenAI routes (/v1, docs/http.md; default: the --target folder's name)",
    )
    p.add_argument("--debug-fault-token", type=int, help=argparse.SUPPRESS)
    # test hooks: switch sessions every N rounds / decoded tokens; verify at most N draft tokens per round
    p.add_argument("--debug-hybrid-every", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--debug-verify-cap", type=int, help=argparse.SUPPRESS)
    p.add_argument("--debug-draft-cap", type=int, default=0, help=argparse.SUPPRESS)
    # `wisp bench`: read `policy NAME` lines on stdin and switch (WispServer.switch_policy), answering
    # `policy NAME ready` on stdout, so every arm shares one model load and one graph capture.
    p.add_argument("--control-stdin", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--sample-host",
        type=Path,
        metavar="DIR",
        help="sample every Python thread's stack at 200 Hz (wisp_cloud/host_sampler.py) and write them, collapsed, "
        "to DIR: with --control-stdin one file per benchmark point (at each `stats`), else one at exit",
    )


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


def _api_tokenizer(args: argparse.Namespace, target: Path):
    """The target's tokenizer and chat template for the OpenAI routes, and the model id they serve."""
    from wisp_sdk.tokenizer import DraftTokenizer

    folder = Path(args.tokenizer_from) if args.random_config and args.tokenizer_from else target
    if args.model_name:
        name = args.model_name
    elif args.target:  # a folder by its name; a known name or hub id (org/name) as given
        name = Path(args.target).name if Path(args.target).expanduser().exists() else args.target
    else:
        name = Path(args.random_config).name
    if not (folder / "tokenizer.json").is_file():
        return None, name  # e.g. --random-config without --tokenizer-from: the websocket only
    return DraftTokenizer(folder), name


def run(args: argparse.Namespace) -> int:
    from wisp_cloud.config import bind, is_loopback, load_auth_tokens
    from wisp_cloud.logs import use_log_format

    use_log_format(args.log_format)

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
        max_siblings=args.max_siblings,
        max_context_len=args.max_context_len,
        max_frame_bytes=args.max_frame_bytes,
        max_sessions=args.max_sessions,
        max_sessions_per_token=args.max_sessions_per_token,
        max_connections=args.max_connections,
        max_connections_per_ip=args.max_connections_per_ip,
        trusted_proxies=frozenset(args.trusted_proxy),
        admission_target=args.admission_target,
        tenant_weights=dict(args.tenant_weight),
        fault_token=args.debug_fault_token,
        hybrid=not args.no_hybrid,
        regime=not args.no_regime,
        start_on_server=not args.no_start_on_server,
        draft_cap=args.draft_cap,
        decode_all=args.decode_all,
        probes=not args.no_probes,
        truncate_drafts=not args.no_truncate,
        fill=not args.no_fill,
        refuse=args.refuse,
        align=args.align,
        hybrid_every=max(0, args.debug_hybrid_every),
        verify_cap=args.debug_verify_cap,
        force_draft_cap=max(0, args.debug_draft_cap),
    )
    if not 0.0 <= cfg.admission_target <= 1.0:
        raise WispError("--admission-target must be in [0, 1]")
    if args.estimator and not Path(args.estimator).is_file():
        raise WispError(f"--estimator {args.estimator}: no such file")
    for name in ("max_batch", "prefill_chunk", "kv_budget_tokens", "max_draft_len", "max_context_len"):
        if getattr(cfg, name) < 1:
            raise WispError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.max_siblings < 0:
        raise WispError("--max-siblings must be >= 0")
    from wisp_cloud.sched import POLICIES

    if cfg.policy not in POLICIES:
        raise WispError(f"--policy {cfg.policy}: unknown (have: {', '.join(POLICIES)})")
    if not cfg.auth_tokens and not is_loopback(cfg.host):
        raise WispError(
            f"refusing to serve on {cfg.host} without auth tokens; give --auth-tokens FILE or WISP_AUTH_TOKENS"
        )
    if args.backend == "fake":
        return _serve(args, cfg, _fake_backend(args), bind(cfg.host, cfg.port, "--port"), None)
    check_model_args(args)
    target = _resolve_target(args.target) if args.target else Path(args.random_config)
    # Ports first: a busy port is one line now, not after a model load of minutes.
    sock = bind(cfg.host, cfg.port, "--port")
    if cfg.metrics_port is not None:  # prometheus binds its own; this probe only fails early
        bind(cfg.metrics_host, cfg.metrics_port, "--metrics-port").close()
    check_device(args.device)

    import torch

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
            # an item is at most a prefill chunk plus a draft, its bonus token and siblings (planner.plan)
            max_q = cfg.prefill_chunk + cfg.max_draft_len + 1 + cfg.max_siblings
            capture_startup_graphs(backend, cfg.max_batch, max_q, cfg.max_context_len, args.graph_warmup_s)
    except (OSError, ValueError) as exc:
        raise WispError(f"cannot load target {target}: {exc}") from exc

    return _serve(args, cfg, backend, sock, target)


def _fake_backend(args: argparse.Namespace) -> Backend:
    """`--backend fake`: the tests' model-free target (wisp_cloud/backends/fake.py), vocabulary 1000."""
    if args.target or args.random_config:
        raise WispError("--backend fake serves no model: drop --target / --random-config")
    if not 0 <= args.fake_step_ms <= 10_000:
        raise WispError("--fake-step-ms must be in [0, 10000]")
    from wisp_cloud.backends.fake import FakeBackend

    return FakeBackend(1000, base_s=args.fake_step_ms / 1000.0)


def _serve(
    args: argparse.Namespace, cfg: ServerConfig, backend: Backend, sock: socket.socket, target: Path | None
) -> int:
    """Serve `backend` on the bound `sock` until SIGINT (at once) or SIGTERM (drain first); `target`: the model
    folder whose tokenizer the OpenAI routes use (None: no /v1 routes)."""
    import asyncio
    import logging
    import signal

    from wisp_cloud.estimator import VerifyTimeEstimator
    from wisp_cloud.logs import log_event
    from wisp_cloud.server import WispServer, tune_runtime

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
        _check_features(estimator, backend, args.estimator)
    elif args.profile_on_start:
        from wisp_cloud.cli_profile import MIN_SEQ_TOKENS, profile_backend

        pool = getattr(backend, "kv_capacity_tokens", None)  # profile the batches this server will run
        max_batch = min(cfg.max_batch, int(pool) // MIN_SEQ_TOKENS) if pool else cfg.max_batch
        estimator, report = profile_backend(backend, "quick", reps=2, max_batch=max(1, max_batch))
        print(
            f"profiled the backend in {report['profile_s']}s: held-out MAPE {report['heldout_mape_pct']}%",
            flush=True,
        )
    else:
        estimator = VerifyTimeEstimator.default()

    tokenizer, model_name = _api_tokenizer(args, target) if target is not None else (None, "fake")

    servers: list[WispServer] = []

    sampler = HostSampler().start() if args.sample_host else None

    def dump_samples(policy: str) -> None:
        if sampler is not None:
            sampler.dump(args.sample_host, policy)

    async def control(server: WispServer) -> None:
        import threading

        from wisp_cloud.sched import POLICIES

        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str] = asyncio.Queue()

        def read() -> None:  # a daemon thread: a blocked read must not hold up the process's exit
            for line in sys.stdin:
                loop.call_soon_threadsafe(lines.put_nowait, line)

        threading.Thread(target=read, daemon=True, name="wisp-control").start()
        while True:
            words = (await lines.get()).split()
            if words == ["stats"]:  # one JSON line: what the bench records after each point
                dump_samples(server.engine.policy.name)
                say("stats " + json.dumps(server.stats()))
                continue
            options = _arm_flags(words[2:])
            if len(words) < 2 or words[0] != "policy" or words[1] not in POLICIES or options is None:
                say(
                    f"control error: expected `policy NAME [{'] ['.join(ARM_FLAGS)}]` (NAME one of "
                    f"{', '.join(POLICIES)}) or `stats`"
                )
                continue
            await server.switch_policy(words[1], options=options)
            if sampler is not None:
                sampler.take()  # the next point's file starts here, without the switch and the idle time before
            say(f"policy {words[1]} ready")

    async def main() -> None:
        server = WispServer(backend, cfg, estimator=estimator, tokenizer=tokenizer, model_name=model_name)
        servers.append(server)
        await server.start(sock)
        tasks = [asyncio.create_task(control(server), name="wisp-control")] if args.control_stdin else []
        tune_runtime()
        stop = asyncio.Event()
        drain = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, lambda: (drain.set(), stop.set()))
        say(f"listening on {cfg.scheme}://{cfg.host}:{server.port}")
        try:
            await stop.wait()
            if drain.is_set() and args.drain_s > 0:  # SIGTERM: finish the rounds in flight first
                await server.drain(args.drain_s)
        finally:
            for task in tasks:
                task.cancel()
            if not args.control_stdin:
                dump_samples(server.engine.policy.name)
            await server.stop()

    try:
        with logs_off_loop():  # a log line is written off the event loop
            asyncio.run(main())
        if args.save_estimator:
            (servers[0].estimator if servers else estimator).save(args.save_estimator)
    finally:
        shutdown = getattr(backend, "shutdown", None)
        if shutdown is not None:
            shutdown()
    return 0


def _check_features(estimator: VerifyTimeEstimator, backend: Backend, path: str) -> None:
    """Warn when a varlen (paged, SGLang) backend is given an estimator with other features: a padded engine's, or
    a profile from before the decode/verify kernel split and the roofline (docs/scheduling.md §1). It still serves,
    but the regime's decode capacity and every batch-time prediction lean on those terms."""
    import logging

    from wisp_cloud.cli_profile import backend_group_rule
    from wisp_cloud.estimator import VARLEN_FEATURES

    if backend_group_rule(backend) is None and tuple(estimator.features) != VARLEN_FEATURES:
        logging.getLogger("wisp.serve").warning(
            "--estimator %s has the features %s, not this engine's %s: profile it again (`wisp profile`) "
            "for its decode/verify kernel split and roofline (docs/scheduling.md section 1)",
            path,
            ",".join(estimator.features),
            ",".join(VARLEN_FEATURES),
        )


def _arm_flags(words: list[str]) -> dict[str, bool] | None:
    """ServerConfig overrides from a control line's flags; None if one is unknown."""
    if any(w not in ARM_FLAGS for w in words):
        return None
    return dict(ARM_FLAGS[w] for w in words)
