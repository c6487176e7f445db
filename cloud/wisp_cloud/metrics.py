"""Observability: Prometheus metrics (one registry per server, so tests can run several); logs are in logs.py."""

from __future__ import annotations

from collections import Counter as TallyCounter

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from wisp_sdk.errors import WispError

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

_SLO_GAUGES = {
    "sessions": "Sessions judged (finished, and live ones on what they did so far)",
    "refused": "Sessions refused by admission control (overloaded)",
    "attained": "Sessions meeting their TTFT and TPOT SLO",
    "attainment": "Fraction of judged sessions meeting their SLO",
    "goodput_tok_s": "Tokens per second from sessions that met their SLO",
    "throughput_tok_s": "Tokens per second from all judged sessions",
    "ttft_p50_ms": "Time to first token, median (server side)",
    "ttft_p99_ms": "Time to first token, p99 (server side)",
    "tpot_p50_ms": "Time per output token, median",
    "tpot_p99_ms": "Time per output token, p99",
    "verify_p50_ms": "Round latency (queue + forward), median",
    "verify_p99_ms": "Round latency (queue + forward), p99",
    "inflation_mean": "Round latency / predicted solo forward time (interference), mean",
    "inflation_p99": "Round latency / predicted solo forward time (interference), p99",
    "round_misses": "Rounds answered after their deadline",
    "wasted_ms": "Drafting time clients reported as wasted (not carried by wisp.v1 yet: 0)",
}


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.sessions = Gauge("wisp_sessions", "Live sessions", registry=r)
        self.sessions_opened = Counter("wisp_sessions_opened", "Sessions opened", ["mode"], registry=r)
        self.sessions_evicted = Counter(
            "wisp_sessions_evicted", "Session KV caches evicted for memory", registry=r
        )
        self.sessions_expired = Counter(
            "wisp_sessions_expired", "Sessions dropped after the idle TTL", registry=r
        )
        self.rounds = Counter("wisp_rounds", "Verify rounds answered", registry=r)
        self.draft_tokens = Counter("wisp_draft_tokens", "Draft tokens received for verification", registry=r)
        self.accepted_tokens = Counter("wisp_accepted_tokens", "Draft tokens accepted", registry=r)
        self.sibling_tokens = Counter(
            "wisp_sibling_tokens",
            "Sibling tokens committed (token trees: a rejected draft token's alternative)",
            registry=r,
        )
        self.unverified_tokens = Counter(
            "wisp_unverified_tokens", "Draft tokens not verified (the tail did not pay the price)", registry=r
        )
        self.switches = Counter(
            "wisp_session_switches",
            "Sessions moved by the hybrid, by the mode they moved to",
            ["to"],
            registry=r,
        )
        self.price_ms = Gauge(
            "wisp_verify_price_ms", "Price of one verified token in the last verdicts", registry=r
        )
        # The regime (sched/regime.py): 1 while the whole fleet is decoded by the server, and the sessions its
        # model says each mode serves at the SLO (-1 before its first decision)
        self.regime_centralized = Gauge(
            "wisp_regime_centralized",
            "1 in the centralized regime (sessions decoded by the server)",
            registry=r,
        )
        self.regime_capacity = Gauge(
            "wisp_regime_capacity",
            "Sessions each mode serves at the SLO, by the regime's model",
            ["mode"],
            registry=r,
        )
        self.committed_tokens = Counter(
            "wisp_committed_tokens", "Tokens committed (accepted + target)", registry=r
        )
        self.batches = Counter("wisp_batches", "Forward passes run", registry=r)
        # Sparse exact sampling (SGLang backend, --sglang-sampling sparse): the residual's rejection loop.
        self.residual_draws = Counter(
            "wisp_sampling_residual_draws",
            "Draws from p tested by the sparse residual's rejection loop",
            registry=r,
        )
        self.dense_fallbacks = Counter(
            "wisp_sampling_dense_fallbacks",
            "Rejected positions whose residual loop ran out of draws and fetched the full-vocabulary p",
            registry=r,
        )
        self.batch_size = Histogram(
            "wisp_verify_batch_size", "Sessions per forward pass", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_latency = Histogram(
            "wisp_verify_batch_seconds", "Forward pass wall time", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "wisp_queue_wait_seconds",
            "Time a job waited before its first batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_tokens = Gauge("wisp_kv_tokens", "Tokens held in KV caches", registry=r)
        self.kv_bytes = Gauge("wisp_kv_bytes", "Bytes of KV cache held", registry=r)
        self.queued = Gauge("wisp_queued_jobs", "Jobs waiting for a batch", registry=r)
        self.errors = Counter("wisp_errors", "Error frames sent", ["code"], registry=r)
        # SLO accounting (slo_metrics.SLOMetrics.summary), refreshed every housekeeping tick and on stats().
        self.slo = {
            key: Gauge(f"wisp_slo_{key}", help_text, registry=r) for key, help_text in _SLO_GAUGES.items()
        }
        # Plain tallies for tests and the --json stats of the scheduling issue: batch size -> count.
        self.batch_size_tally: TallyCounter[int] = TallyCounter()
        self._http = None

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batches.inc()
        self.batch_size.observe(size)
        self.batch_latency.observe(seconds)
        self.batch_size_tally[size] += 1

    def set_regime(self, centralized: bool, decode: int, speculative: int) -> None:
        self.regime_centralized.set(1.0 if centralized else 0.0)
        self.regime_capacity.labels("centralized").set(decode)
        self.regime_capacity.labels("speculative").set(speculative)

    def set_slo(self, summary: dict[str, float]) -> None:
        for key, gauge in self.slo.items():
            if key in summary:
                gauge.set(summary[key])

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the /metrics endpoint; returns the bound port (useful with port 0)."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise WispError(
                f"--metrics-port {port}: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
