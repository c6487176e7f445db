"""Server configuration: every knob `wisp serve` exposes, with defaults that suit a CPU or a single GPU."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from wisp_sdk.errors import WispError

AUTH_ENV = "WISP_AUTH_TOKENS"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    policy: str = "fifo"
    max_batch: int = 64  # sessions per forward pass
    prefill_chunk: int = 256  # context tokens a session may push through one forward pass
    kv_budget_tokens: int = 262_144  # all sessions' cached tokens together
    session_ttl_s: float = 600.0
    auth_tokens: frozenset[str] = field(default_factory=frozenset)
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    max_draft_len: int = 32
    # Sibling tokens a round may carry (token trees, `Limits.max_siblings`; capped by the backend's own limit,
    # 0 for SGLang). `--max-siblings 0` turns trees off.
    max_siblings: int = 8
    max_context_len: int = 8192
    max_frame_bytes: int = 1 << 20
    max_sessions: int = 4096
    max_sessions_per_token: int = 256
    # `--policy wisp` only: refuse a new session (`overloaded`) when the estimator predicts the admitted
    # sessions' SLO attainment would fall below this; 0 disables admission control.
    admission_target: float = 0.9
    # Weighted fair sharing across tenants (sched/fairness.py): weight by tenant id (`sessions.owner_key` of the
    # auth token, as logged at Hello; "anon" without auth). Tenants not named weigh 1.
    tenant_weights: dict[str, float] = field(default_factory=dict)
    # `--policy wisp` only (docs/scheduling.md): the load-adaptive hybrid (switch a session to server-side decoding
    # when its speculation costs the others more than it saves, and back when the load falls), and verifying only
    # the prefix of a draft whose survival pays the verify price. `--no-hybrid`, `--no-truncate` turn them off.
    hybrid: bool = True
    # `--policy wisp`: the regime (sched/regime.py): the hybrid moves every session to server-side decoding while
    # the estimator's physics says decoding serves more sessions at the SLO than speculation, and sessions that
    # offer it start decoded while their draft prefills. Measured on an H200 (runs 21-22, docs/benchmarks.md) it
    # serves as many as centralized serving where speculation cannot pay. `--no-regime` turns it off.
    regime: bool = True
    # `--policy wisp` with the regime: take devices' `start_on_server` offers (decode a session's first tokens while
    # its draft prefills the prompt). `--no-start-on-server` declines them: in the simulator validated on H200 run
    # 40 (7B, Mac mini, ShareGPT) the offers cost WISP 15-19 % of its goodput at 640-720 devices; on the GPU (run
    # 23, 32B, HumanEval, TPOT 30) they lifted WISP at 32 devices from 0.69 to 0.92. Not yet an A/B on a GPU.
    start_on_server: bool = True
    # `--policy wisp` with the regime, `--draft-cap`: under load, cap drafts at the regime's best draft length
    # (`Verdict.draft_cap`, sched/regime.py). Off by default: on an H200 it raised 32B / Jetson / code10 from ≤ 1.00×
    # to 1.06× centralized (run 56) and took 7B / Jetson / code10 from 0.97 to 0.31 attainment at 960 devices
    # (run 57; docs/scheduling.md §13).
    draft_cap: bool = False
    # Benchmarks (`--decode-all`, arm `wisp~decode-all`): the regime holds the centralized mode from the first
    # session on and never decides, so WISP's decode path (probes and start-on-server included) runs beside
    # centralized serving's at any N (H200 run 52: after its flip WISP's steps cost 1.65x centralized's host time).
    decode_all: bool = False
    # Benchmarks (`--no-probes`, arm `wisp~no-probes`): no session opens as a regime probe (sched/regime.py), so
    # the decode path can be measured without the probes' speculative rounds; the regime then learns nothing new
    # while it decodes the fleet.
    probes: bool = True
    truncate_drafts: bool = True
    # `--policy wisp`: fill the weight read (sched/fill.py): decodes ride every step together, a small batch waits
    # for announced rounds when that serves more per GPU second. `--no-fill` turns it off.
    fill: bool = True
    # `--policy wisp`: with `--refuse`, a round or decode is also left out of a batch when joining would push a
    # member past its deadline. Off by default: a round left out waits a whole step, far more than the ≈ 0.5 ms it
    # adds to a step (measured, H200, 7B, TPOT 30, 224 devices: attainment 0.39 with it, 0.86 without). Prompt
    # pieces are always checked: that is the interference WISP prevents.
    refuse: bool = False
    # `--policy wisp --align`: each verdict carries `launch_in_ms`, when the step after the running one launches,
    # so that devices draft what fits before it and their rounds arrive together (docs/scheduling.md §11). Off by
    # default (verdicts carry 0, the controller decides as without the hint): simulated, it helps at 32B and
    # costs at 7B through the hybrid's too-slow test, and no GPU has measured it.
    align: bool = False
    # Test hooks (hidden flags), active under any policy: switch every N rounds / decoded tokens; verify at most
    # this many draft tokens of a round; every verdict caps the next round's draft at this many (0: the regime's).
    hybrid_every: int = 0
    verify_cap: int | None = None
    force_draft_cap: int = 0
    # Bounded work per connection (docs/security.md): a connection must say Hello within `hello_timeout_s`; at
    # most `max_connections` at once and `max_connections_per_ip` from one address; closed after
    # `max_bad_frames` refused frames; at most `outbox_frames` answers queued for a client that does not read.
    hello_timeout_s: float = 10.0
    max_connections: int = 16384
    max_connections_per_ip: int = 4096  # a benchmark fleet on one machine opens thousands from one address
    # Balancers whose websockets carry the client's address in X-Forwarded-For (its last entry is the one the
    # balancer added, so a client cannot forge it): the per-address cap and the logs use that address.
    trusted_proxies: frozenset[str] = frozenset()
    max_bad_frames: int = 32
    outbox_frames: int = 1024
    # Debug only (hidden flag): a draft containing this token id fails inside the batch step, to exercise the
    # `internal` error path end to end.
    fault_token: int | None = None

    @property
    def scheme(self) -> str:
        return "wss" if self.tls_cert else "ws"


def parse_tenant_weight(text: str) -> tuple[str, float]:
    """`TENANT=W`, W a positive finite number (an argparse type: a bad one is one usage line, exit 2)."""
    name, sep, value = text.partition("=")
    try:
        weight = float(value)
    except ValueError:
        weight = math.nan
    if not sep or not name.strip() or not math.isfinite(weight) or weight <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TENANT=W with W a positive number")
    return name.strip(), weight


def load_auth_tokens(path: str | None) -> frozenset[str]:
    """Tokens from a file (one per line, # comments) and/or WISP_AUTH_TOKENS (comma-separated)."""
    tokens: set[str] = set()
    if path:
        file = Path(path)
        if not file.is_file():
            raise WispError(f"--auth-tokens {path}: no such file")
        for line in file.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                tokens.add(line)
        if not tokens:
            raise WispError(f"--auth-tokens {path} holds no tokens")
    env = os.environ.get(AUTH_ENV, "")
    tokens.update(t.strip() for t in env.split(",") if t.strip())
    return frozenset(tokens)


def bind(host: str, port: int, flag: str) -> socket.socket:
    """A listening socket, bound before any model loads: a busy port is one line at once, not after the load."""
    try:
        return socket.create_server((host, port))
    except OSError as exc:
        why = (
            os.strerror(exc.errno) if exc.errno else str(exc)
        )  # create_server appends the address to strerror
        raise WispError(f"{flag} {port}: cannot listen on {host}:{port}: {why}") from None


def is_loopback(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address."""
    if host in ("", "0.0.0.0", "::"):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


# ServerConfig's WISP switches that `wisp serve --FLAG` sets, and that an arm of `wisp bench` may set for itself
# (`wisp~no-fill`; WispServer.switch_policy): flag -> (field, value)
ARM_FLAGS: dict[str, tuple[str, bool]] = {
    "no-fill": ("fill", False),
    "no-hybrid": ("hybrid", False),
    "no-regime": ("regime", False),
    "regime": ("regime", True),  # runs 21-22 ran it as an arm, before it was the default
    "no-start-on-server": ("start_on_server", False),
    "no-truncate": ("truncate_drafts", False),
    "draft-cap": ("draft_cap", True),
    "no-draft-cap": ("draft_cap", False),
    "decode-all": ("decode_all", True),
    "no-probes": ("probes", False),
    "refuse": ("refuse", True),
    "align": ("align", True),
}
