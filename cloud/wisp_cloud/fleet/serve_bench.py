"""A bench server: `WispServer` with the scheduling policies of `scheduler.py` and any backend, random weights
allowed. `wisp bench run --server-cmd "python -m wisp_cloud.fleet.serve_bench ..."` uses it while `wisp serve`
does not yet expose the scheduler policies or the paged backend.

The adapter below (`SchedPolicy`) is the server-side glue between the server's `Policy` protocol (policy.py:
select over waiting `Job`s) and `scheduler.make_policy` (select over `Request`s): each waiting job becomes a
`Request` with its deadline from `deadlines.SessionDeadlines` (SLO of the session), a prefill piece size is
handed back through `job.max_tokens`, the estimator learns online from every batch, and verdicts carry the
`WaitHints` prediction. No admission control (every session is admitted; refusals would count as misses in
the bench anyway).

    python -m wisp_cloud.fleet.serve_bench --config qwen2.5-7b --random-weights --tokenizer-from BUNDLE \\
        --backend paged --device cuda --policy wisp --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from wisp_cloud.deadlines import SessionDeadlines
from wisp_cloud.estimator import ItemShape, VerifyTimeEstimator
from wisp_cloud.scheduler import Request, WaitHints, make_policy

log = logging.getLogger("wisp.serve_bench")

# Public architecture configs (no weights): Qwen2.5-7B and -32B as published in their config.json.
CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "use_sliding_window": False,
    },
    "qwen2.5-32b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 5120,
        "intermediate_size": 27648,
        "num_hidden_layers": 64,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "use_sliding_window": False,
    },
}


class SchedPolicy:
    """Server `Policy` backed by a `scheduler.py` policy (wisp, sled, centralized, fifo)."""

    def __init__(self, name: str, estimator: VerifyTimeEstimator, max_batch: int, learn: bool = True) -> None:
        self.name = name
        self.est = estimator
        self.policy = make_policy(name, estimator, max_batch=max_batch)
        self.hints = WaitHints(estimator)
        self.learn = learn
        self.dl: dict[str, SessionDeadlines] = {}
        self._last: dict[str, tuple[int, int, float]] = {}  # session -> (committed_len, drafted, answered at)
        self._batch: list[tuple[Any, ItemShape, bool]] = []
        self.batches = 0
        self.select_s = 0.0

    def _deadlines(self, job: Any) -> SessionDeadlines:
        s = job.session
        d = self.dl.get(s.id)
        if d is None:
            d = SessionDeadlines.from_slo(s.slo, job.enqueued_at, max_new_tokens=s.max_new_tokens)
            self.dl[s.id] = d
        return d

    def _request(self, job: Any, now: float) -> Request:
        s = job.session
        d = self._deadlines(job)
        kind = job.kind.value
        last = self._last.get(s.id)
        if last is not None and s.committed_len > last[0]:  # the previous answer was sent: account for it
            committed = s.committed_len - last[0]
            if d.t_first is None:
                d.on_first_token(last[2])
            else:
                d.on_round(last[1], max(0, committed - 1), last[2])
            self._last[s.id] = (s.committed_len, last[1], last[2])
        pending_ctx = s.committed_len - job.cached_len
        if kind == "open" or (pending_ctx > 1 and kind != "round"):
            req_kind, deadline, exp = "prefill", d.prefill_deadline(), 1.0
        elif kind == "round":
            k = len(job.draft)
            req_kind, deadline, exp = "verify", d.round_deadline(k, job.enqueued_at), d.expected_tokens(k)
        else:
            req_kind, deadline, exp = "decode", d.round_deadline(0, job.enqueued_at), 1.0
        return Request(
            s.id,
            req_kind,  # type: ignore[arg-type]
            max(1, job.pending_tokens),
            job.cached_len,
            deadline=deadline,
            arrival=job.enqueued_at,
            expected_tokens=exp,
            cache_miss=job.cache_miss and kind != "open",
            payload=job,
        )

    def select(self, waiting: list[Any], max_batch: int, now: float) -> list[Any]:
        t = time.perf_counter()
        reqs = [self._request(j, now) for j in waiting]
        batch = self.policy.select(reqs, now)
        out = []
        self._batch = []
        for slot in batch.slots:
            job = slot.request.payload
            job.max_tokens = slot.n_tokens
            out.append(job)
            self._batch.append((job, slot.shape, slot.final))
        if out:
            self.hints.started(batch.predicted_s, now)
        self.select_s += time.perf_counter() - t
        return out[:max_batch]

    def observe(self, stats: Any, jobs: list[Any]) -> None:
        now = time.monotonic()
        shapes = [sh for _, sh, _ in self._batch]
        if self.learn and stats.forward_s > 0 and shapes:
            self.est.observe(stats.forward_s, shapes)
        self.hints.finished(shapes, now)
        self.batches += 1
        for job, _, final in self._batch:
            if not final:
                continue
            s = job.session
            if job.kind.value != "open" and job.started_at is not None:
                self.hints.queued(job.started_at - job.enqueued_at)
            # committed_len before this job's answer; the answer is sent right after this call
            self._last[s.id] = (s.committed_len, len(job.draft), now)
            if s.done:
                self.dl.pop(s.id, None)
                self._last.pop(s.id, None)
        self._batch = []

    def wait_hint_ms(self, session: Any, queued: int) -> float:
        return 1000.0 * self.hints.hint(ItemShape(5, session.committed_len), time.monotonic())

    def admit(self, session_count: int, queued: int) -> bool:
        return True


async def _control(server: Any, est: VerifyTimeEstimator, max_batch: int, stop: asyncio.Event) -> None:
    """`policy NAME` on stdin swaps the server's policy (same process, model, KV pool and estimator)."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        parts = line.split()
        if len(parts) == 2 and parts[0] == "policy":
            old = server.policy
            print(
                f"[serve_bench] {old.name}: {old.batches} batches, select {old.select_s:.2f}s, "
                f"counters {dict(getattr(old.policy, 'counters', {}))}",
                file=sys.stderr,
                flush=True,
            )
            server.policy = SchedPolicy(parts[1], est, max_batch)
            print(f"policy {parts[1]} ok", flush=True)


def _build_backend(args: argparse.Namespace) -> Any:
    import torch

    fp = None
    if args.tokenizer_from:
        from wisp_sdk.bundle import tokenizer_fingerprint

        fp = tokenizer_fingerprint(Path(args.tokenizer_from) / "tokenizer.json")
    if args.random_weights:
        from transformers import AutoConfig

        spec = CONFIGS.get(args.config) or json.loads(Path(args.config).read_text())
        spec = dict(spec)
        mt = spec.pop("model_type")
        config = AutoConfig.for_model(mt, **spec)
        torch.manual_seed(args.seed)
        if args.backend != "paged":
            raise SystemExit("--random-weights needs --backend paged")
        from wisp_cloud.backends.paged import PagedBackend

        be = PagedBackend(
            config,
            args.device,
            args.dtype,
            kv_budget_tokens=args.kv_budget_tokens,
            tokenizer_fingerprint=fp,
            cuda_graphs=False if args.no_cuda_graphs else None,
        )
        if args.embed_scale != 1.0:
            # A random model's logits are nearly flat, so bf16 differences between batch compositions flip its
            # greedy argmax and the precomputed continuations stop matching. Scaling the token embeddings makes
            # the residual stream (and so the argmax) follow the last token, robustly; the compute is unchanged.
            with torch.no_grad():
                be.model.get_input_embeddings().weight.mul_(args.embed_scale)
        return be
    if args.backend == "paged":
        from wisp_cloud.backends.paged import PagedBackend

        return PagedBackend(args.target, args.device, args.dtype, kv_budget_tokens=args.kv_budget_tokens)
    from wisp_cloud.backends.native import NativeBackend

    return NativeBackend(args.target, device=args.device, dtype=args.dtype)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m wisp_cloud.fleet.serve_bench")
    p.add_argument("--target", help="HF folder (native/paged)")
    p.add_argument("--config", default="qwen2.5-7b", help="with --random-weights: a name or a config.json")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--tokenizer-from", help="bundle/folder whose tokenizer.json the drafts use")
    p.add_argument("--backend", default="paged", choices=["paged", "native"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--policy", default="wisp")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=128)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--kv-budget-tokens", type=int, default=400_000)
    p.add_argument("--session-ttl", type=float, default=10.0)
    p.add_argument(
        "--estimator", help="estimator JSON to start from (default: a quick profile of the backend)"
    )
    p.add_argument("--profile-reps", type=int, default=1)
    p.add_argument("--save-estimator", help="write the (online-refined) estimator here on exit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cuda-graphs", action="store_true", help="paged backend: eager kernels, no graphs")
    p.add_argument("--embed-scale", type=float, default=1.0, help="random weights: scale token embeddings")
    p.add_argument("--threads", type=int)
    p.add_argument(
        "--control-stdin", action="store_true", help="read `policy NAME` lines on stdin to switch policy"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from wisp_cloud.config import ServerConfig
    from wisp_cloud.server import WispServer

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    backend = _build_backend(args)
    print(
        f"[serve_bench] backend {getattr(backend, 'name', '?')} ready in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    if args.estimator and Path(args.estimator).is_file():
        est = VerifyTimeEstimator.load(args.estimator)
        print(f"[serve_bench] estimator from {args.estimator}", file=sys.stderr)
    else:
        from wisp_cloud.cli_profile import profile_backend

        t = time.perf_counter()
        est, report = profile_backend(backend, "quick", args.profile_reps, args.seed, progress=False)
        print(f"[serve_bench] profile {report} ({time.perf_counter() - t:.1f}s)", file=sys.stderr)
        for path in (args.save_estimator, args.estimator):
            if path:
                est.save(path)
    cfg = ServerConfig(
        host=args.host,
        port=args.port,
        policy=args.policy,
        max_batch=args.max_batch,
        prefill_chunk=args.prefill_chunk,
        kv_budget_tokens=args.kv_budget_tokens,
        session_ttl_s=args.session_ttl,
        max_sessions=100_000,
        max_sessions_per_token=100_000,
    )
    policy = SchedPolicy(args.policy, est, args.max_batch)

    async def run() -> None:
        server = WispServer(backend, cfg, policy=policy)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"listening on {cfg.scheme}://{cfg.host}:{server.port}", flush=True)
        if args.control_stdin:
            asyncio.create_task(_control(server, est, args.max_batch, stop))
        try:
            await stop.wait()
        finally:
            print(
                f"[serve_bench] {policy.batches} batches, select {policy.select_s:.2f}s, "
                f"counters {dict(getattr(policy.policy, 'counters', {}))}",
                file=sys.stderr,
            )
            await server.stop()

    asyncio.run(run())
    if args.save_estimator:
        est.save(args.save_estimator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
