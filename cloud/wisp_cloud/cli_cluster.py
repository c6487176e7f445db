"""`wisp cluster`: N `wisp serve` replicas behind HAProxy, on one machine (docs/deploy.md).

Only argparse at import time; the replicas are subprocesses, so this process never loads a model.
"""

from __future__ import annotations

import argparse

from wisp_sdk.argtypes import number
from wisp_sdk.errors import WispError

from wisp_cloud.cli_serve import add_serve_args
from wisp_cloud.logs import say

# Serve flags the cluster sets per replica itself, or that cannot be shared by N replicas on one machine.
_OWN = ("host", "port", "device")
_REFUSED = {
    "metrics_port": "--metrics-port: every replica serves /metrics on its own port (see `replica` lines)",
    "tls_cert": "--tls-cert: terminate TLS at the balancer (docs/deploy.md, TLS)",
    "tls_key": "--tls-key: terminate TLS at the balancer (docs/deploy.md, TLS)",
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "cluster",
        help="serve with N replicas behind HAProxy (sticky sessions, drain on stop)",
        description="Start N `wisp serve` replicas (one per visible GPU with --device cuda, else on the CPU) "
        "and HAProxy in front, with cookie affinity and /ready health checks. Prints `listening on "
        "ws://HOST:PORT` (the balancer), then `replica I pid PID URL` per replica. SIGINT/SIGTERM drain the "
        "replicas and stop everything; SIGHUP restarts the replicas one at a time (rolling, with drain). "
        "Every `wisp serve` flag is passed to each replica.",
    )
    p.add_argument(
        "--replicas", type=number(int, min=1), required=True, help="number of `wisp serve` replicas"
    )
    p.add_argument(
        "--haproxy", default="haproxy", metavar="PATH", help="the HAProxy binary (default: on PATH)"
    )
    add_serve_args(p)
    p.set_defaults(func=run)


def serve_argv(args: argparse.Namespace) -> list[str]:
    """The `wisp serve` flags of `args` that differ from serve's defaults, as a command line."""
    probe = argparse.ArgumentParser(add_help=False)
    add_serve_args(probe)
    defaults = vars(probe.parse_args([]))
    argv: list[str] = []
    for dest, default in defaults.items():
        value = getattr(args, dest)
        if dest in _OWN or value == default:
            continue
        if dest in _REFUSED:
            raise WispError(f"wisp cluster does not take {_REFUSED[dest]}")
        flag = "--" + dest.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):  # a repeatable flag (--tenant-weight A=2): once per value
            for item in value:
                argv += [flag, _text(item)]
        else:
            argv += [flag, _text(value)]
    return argv


def _text(value: object) -> str:
    """A parsed value back as its command-line text (`TENANT=W` pairs come back as tuples)."""
    return "=".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def run(args: argparse.Namespace) -> int:
    import signal
    import sys
    import threading

    from wisp_cloud.cluster import Cluster
    from wisp_cloud.config import is_loopback
    from wisp_cloud.random_model import check_model_args

    check_model_args(args)
    if not is_loopback(args.host) and not args.auth_tokens:
        raise WispError(
            f"refusing to serve on {args.host} without auth tokens; give --auth-tokens FILE or WISP_AUTH_TOKENS"
        )
    cluster = Cluster(
        args.replicas,
        serve_argv(args),
        host=args.host,
        port=args.port,
        device=args.device,
        gpus_per_replica=args.sglang_tp if args.backend == "sglang" else 1,
        haproxy=args.haproxy,
        drain_s=args.drain_s,
    )
    stop = threading.Event()
    rolling = threading.Event()

    def on_stop(*_: object) -> None:
        stop.set()
        cluster.abort.set()

    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGHUP, lambda *_: rolling.set())
    try:
        cluster.start()
        say(f"listening on {cluster.url}")
        for r in cluster.replicas:
            say(f"replica {r.index} pid {r.pid} {r.url}")
        while not stop.wait(0.5):
            if rolling.is_set():
                rolling.clear()
                cluster.rolling_restart()
                for r in cluster.replicas:
                    say(f"replica {r.index} pid {r.pid} {r.url}")
            for r in cluster.replicas:
                if not r.alive() and not r.exit_reported:
                    r.exit_reported = True
                    code = r.proc.returncode if r.proc is not None else None
                    print(f"replica {r.index} exited with code {code}", file=sys.stderr, flush=True)
    finally:
        cluster.stop()
    return 0
