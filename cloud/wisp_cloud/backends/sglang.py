"""SGLang backend: the verifier's forward passes run on an SGLang `Engine` (radix KV cache, continuous batching,
tensor/data parallelism on GPUs). `wisp serve --backend sglang`; docs/sglang.md.

Mapping onto the public Engine API (measured on sglang 0.5.23):

* SGLang owns the KV (its radix cache), so `cached_len`/`truncate`/`release` are bookkeeping: the backend keeps
  each sequence's tokens-so-far and sends the FULL token list every time. The radix cache matches the shared
  prefix, so only the new tokens (plus the few whose logits are asked for) are computed.
* A work item with `n` new tokens asking for `m = n_logits` distributions becomes one request
  `input_ids = tokens[:cached] + new_tokens` (length L), `max_new_tokens=1`, `temperature=0`,
  `return_logprob=True`, `logprob_start_len = L - m`: input-logprob entries 1..m-1 are the distributions after
  tokens L-m .. L-2, and the distribution after the last token is the output position.
  - greedy: `top_logprobs_num=1` gives the argmax of entries 1..m-1; the generated token is the argmax after the
    last token (the bonus). Token-identical to HF / the native backend.
  - sampling, `sampling="sparse"` (default): one request per verified position; SGLang draws from p and
    returns p at q's support only (sglang_sampling.py); acceptance runs on that (sparse_acceptance.py, exact).
  - sampling, `sampling="full"`: SGLang's input logprobs are the raw log-softmax of the logits (no
    temperature / top-k / top-p). The backend asks for the FULL vocabulary (`top_logprobs_num=vocab`) and
    appends one placeholder token so that the last position is an input entry too; `acceptance.process_logits`
    then applies temperature, top-k and top-p exactly as for the native backend (softmax is shift-invariant, so
    log-softmax in place of logits gives the same p). Exact, and seeded runs commit the native backend's tokens,
    but the cost grows with the vocabulary (~0.4 s per position at 152k). The sparse path falls back to it for
    one position when its residual rejection loop runs out of draws. `sampling="refuse"` turns sampling
    sessions away with a clear error.
* Ordering: each request carries `priority` = its deadline in integer milliseconds of the monotonic clock
  (the engine runs with `--enable-priority-scheduling --schedule-low-priority-values-first`), and the `wisp`
  SGLang plugin (sglang_plugin.py) reorders SGLang's waiting queue by WISP urgency/density and reports SGLang's
  real per-batch timings, which this backend feeds into an attached `VerifyTimeEstimator`.
* Engine calls run on the engine's own event loop, driven by a daemon thread (`asyncio.run()` from the caller's
  thread would hang: the tokenizer manager's receive loop lives on the engine's loop).

sglang is imported only here, lazily (sglang_sampling.py imports only dill, SGLang's own dependency): the rest of
wisp_cloud never needs it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from wisp_sdk.errors import WispError

from wisp_cloud.backends.base import BatchStats, ItemResult, Sampling, WorkItem, check_batch
from wisp_cloud.backends.sglang_sampling import (
    HFWarpers,
    SGLangSparseTarget,
    output_probs,
    output_token,
    position_request,
)

log = logging.getLogger(__name__)

# Priority for items without a deadline (low values first): after every real deadline.
NO_DEADLINE_PRIORITY = 2**62
# Environment the plugin reads inside SGLang's scheduler process.
ENV_ENABLE = "WISP_SGLANG_PLUGIN"  # "1": the wisp plugin hooks SGLang (it is a no-op otherwise)
ENV_TIMINGS = "WISP_SGLANG_TIMINGS"  # JSONL file the plugin appends per-batch timings to
ENV_ESTIMATOR = "WISP_SGLANG_ESTIMATOR"  # optional estimator JSON the plugin starts from
ENV_ORDER = "WISP_SGLANG_ORDER"  # "wisp" (default): urgency/density; "deadline": SGLang's priority order only
RID_PREFIX = "wisp"

_SAMPLING_MODES = ("sparse", "full", "refuse")
_SAMPLING_ALIASES = {"exact": "full"}  # the full-vocabulary path's name before the sparse one existed
_TIMINGS_ROTATE_BYTES = 8 << 20
CPU_DEFAULT_MAX_TOTAL_TOKENS = (
    262_144  # SGLang KV pool size on CPU unless given (the server's default KV budget)
)


def deadline_priority(deadline: float | None) -> int:
    """SGLang `priority` for a monotonic-clock deadline (seconds): integer milliseconds, lower runs first."""
    if deadline is None:
        return NO_DEADLINE_PRIORITY
    return int(deadline * 1000.0)


def make_rid(seq_id: str, serial: int, n_logits: int) -> str:
    """Request id the plugin can read: `wisp:<n_logits>:<serial>:<seq_id>` (n_logits is the density's numerator)."""
    return f"{RID_PREFIX}:{n_logits}:{serial}:{seq_id}"


def parse_rid(rid: str) -> tuple[int, str] | None:
    """(n_logits, seq_id) of a WISP request id, None for anyone else's request."""
    parts = rid.split(":", 3)
    if len(parts) != 4 or parts[0] != RID_PREFIX:
        return None
    try:
        return int(parts[1]), parts[3]
    except ValueError:
        return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class SGLangBackend:
    """Backend over an in-process `sglang.Engine` (which runs its scheduler and detokenizer as subprocesses)."""

    name = "sglang"
    graph_stats: dict[str, float] | None = None  # SGLang's own graphs are not counted here
    max_siblings = 0  # chains only: SGLang's extend has no tree mask here

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        dtype: str = "auto",
        *,
        sampling: str = "sparse",
        tp_size: int = 1,
        dp_size: int = 1,
        mem_fraction_static: float | None = None,
        max_running_requests: int | None = None,
        max_total_tokens: int | None = None,
        order: str = "wisp",
        estimator: Any = None,
        estimator_path: str | Path | None = None,
        seed: int = 0,
        engine_kwargs: dict | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        from wisp_sdk.bundle import tokenizer_fingerprint

        sampling = _SAMPLING_ALIASES.get(sampling, sampling)
        if sampling not in _SAMPLING_MODES:
            raise WispError(f"sglang sampling mode {sampling!r}: use one of {', '.join(_SAMPLING_MODES)}")
        if order not in ("wisp", "deadline"):
            raise WispError(f"sglang order {order!r}: use wisp or deadline")
        path = Path(model_dir)
        tok_json = path / "tokenizer.json"
        if not tok_json.is_file():
            raise FileNotFoundError(
                f"{path} has no tokenizer.json: the server needs it to check draft tokenizers"
            )
        config = _read_json(path / "config.json")
        if not config:
            raise WispError(f"{path}: no readable config.json")
        text = config.get("text_config") or config
        self.tokenizer_fingerprint = tokenizer_fingerprint(tok_json)
        self.sampling_mode = sampling
        self.device = device
        self.timeout_s = timeout_s
        self.vocab_size = int(text["vocab_size"])
        self.max_positions = int(text.get("max_position_embeddings") or 0) or None
        gen = _read_json(path / "generation_config.json")
        eos = gen.get("eos_token_id", text.get("eos_token_id"))
        self.eos_token_ids = [
            int(e) for e in ([] if eos is None else eos if isinstance(eos, list) else [eos])
        ]
        heads = int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
        if dtype == "auto":
            dtype = "float32" if device == "cpu" else "bfloat16"
        itemsize = 4 if dtype == "float32" else 2
        self.bytes_per_token = 2 * int(text["num_hidden_layers"]) * kv_heads * head_dim * itemsize
        self.estimator = estimator
        self._seqs: dict[str, list[int]] = {}
        self._serial = itertools.count()
        # Sparse sampling: extra draws from p sent by the residual loop, and positions that fell back to full p.
        # (The runner settles sparse decisions on several threads: the counters take a lock.)
        self.residual_draws = 0
        self.residual_fallbacks = 0
        self._count_lock = threading.Lock()
        # SGLang's own per-batch timings, as reported by the wisp plugin (most recent last).
        self.sglang_batches: deque[dict] = deque(maxlen=4096)
        fd, timings = tempfile.mkstemp(prefix="wisp-sglang-", suffix=".jsonl")
        os.close(fd)
        self._timings_path = Path(timings)
        self._timings_pos = 0

        # The plugin and the CPU engine read these in SGLang's subprocesses (spawned after this point).
        os.environ[ENV_ENABLE] = "1"
        os.environ[ENV_TIMINGS] = str(self._timings_path)
        os.environ[ENV_ORDER] = order
        if estimator_path is not None:  # the plugin's own estimator (in the scheduler process) starts from it
            os.environ[ENV_ESTIMATOR] = str(estimator_path)
        if device == "cpu":
            os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        try:
            import sglang  # noqa: F401
            from sglang.srt.entrypoints.engine import Engine
        except ImportError as exc:
            self._timings_path.unlink(missing_ok=True)
            raise WispError(
                f"--backend sglang needs the sglang package ({exc}); install it in its own environment: "
                "bash scripts/setup_sglang.sh (CPU) or see docs/sglang.md (GPU)"
            ) from exc
        self._warpers = HFWarpers.to_str() if sampling == "sparse" else ""

        kwargs: dict[str, Any] = dict(
            model_path=str(path),
            skip_tokenizer_init=True,
            device=device,
            dtype=dtype,
            tp_size=tp_size,
            dp_size=dp_size,
            random_seed=seed,
            enable_priority_scheduling=True,
            schedule_low_priority_values_first=True,
            schedule_policy="fcfs",
            log_level=os.environ.get("WISP_SGLANG_LOG_LEVEL", "warning"),
        )
        if device == "cpu":
            kwargs.update(
                attention_backend="torch_native", disable_cuda_graph=True, disable_overlap_schedule=True
            )
        if sampling == "sparse":
            kwargs["enable_custom_logit_processor"] = True  # HFWarpers: HF's top-k/top-p in SGLang's sampler
        if max_total_tokens is None and device == "cpu":
            # On CPU SGLang sizes its KV pool from a fraction of *system* memory (17 GB for the tiny test model on a
            # 24 GB machine): cap it at a token count instead.
            max_total_tokens = CPU_DEFAULT_MAX_TOTAL_TOKENS
        if max_total_tokens is not None:
            kwargs["max_total_tokens"] = max_total_tokens
        if mem_fraction_static is not None:
            kwargs["mem_fraction_static"] = mem_fraction_static
        if max_running_requests is not None:
            kwargs["max_running_requests"] = max_running_requests
        kwargs.update(engine_kwargs or {})
        self.engine_kwargs = kwargs

        # The engine binds the event loop current at construction: give it a fresh one and drive it forever from
        # a daemon thread. (Construction itself must stay on the caller's thread: SGLang installs signal
        # handlers, which only the main thread may do.)
        self._loop = asyncio.new_event_loop()
        previous = None
        try:
            previous = asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:
            pass
        asyncio.set_event_loop(self._loop)
        started = time.perf_counter()
        try:
            self.engine = Engine(**kwargs)
        except Exception as exc:
            self._loop.close()
            self._timings_path.unlink(missing_ok=True)
            raise WispError(f"SGLang engine failed to start for {path}: {type(exc).__name__}: {exc}") from exc
        finally:
            asyncio.set_event_loop(previous)
        self.startup_s = time.perf_counter() - started
        self._thread = threading.Thread(target=self._loop.run_forever, name="wisp-sglang-loop", daemon=True)
        self._thread.start()
        self._closed = False
        log.info(
            "backend=sglang model=%s device=%s dtype=%s tp=%d dp=%d vocab=%d sampling=%s order=%s startup=%.1fs",
            path,
            device,
            dtype,
            tp_size,
            dp_size,
            self.vocab_size,
            sampling,
            order,
            self.startup_s,
        )

    # ---- KV bookkeeping (SGLang's radix cache holds the real KV) ----

    def cached_len(self, seq_id: str) -> int:
        seq = self._seqs.get(seq_id)
        return len(seq) if seq is not None else 0

    def truncate(self, seq_id: str, length: int) -> None:
        seq = self._seqs.get(seq_id)
        if seq is not None and length < len(seq):
            del seq[max(0, length) :]

    def release(self, seq_id: str) -> None:
        # The radix cache evicts the sequence's pages on its own (LRU) once nothing references them.
        self._seqs.pop(seq_id, None)

    def kv_bytes(self, seq_id: str | None = None) -> int:
        """KV the sequences' committed tokens occupy (SGLang may share prefixes and evict on its own)."""
        if seq_id is not None:
            return self.cached_len(seq_id) * self.bytes_per_token
        return sum(len(s) for s in self._seqs.values()) * self.bytes_per_token

    # ---- the forward pass ----

    def _sparse(self, item: WorkItem) -> bool:
        return item.n_logits > 0 and not item.sampling.greedy and self.sampling_mode == "sparse"

    def _requests(self, item: WorkItem, tokens: list[int]) -> list[dict]:
        """Engine.async_generate kwargs for one item: one request, or one per position on the sparse path."""
        m = item.n_logits
        if self._sparse(item):
            support = item.support or []
            first = len(tokens) - m + 1  # position j follows tokens[: first + j]
            reqs = [
                position_request(
                    tokens[: first + j], item.sampling, support[j] if j < len(support) else [], self._warpers
                )
                for j in range(m)
            ]
            for kw in reqs:
                kw.update(self._tags(item.seq_id, 1, item.deadline))
            return reqs
        kw: dict[str, Any] = dict(input_ids=tokens, sampling_params={"max_new_tokens": 1, "temperature": 0.0})
        kw.update(self._tags(item.seq_id, m, item.deadline))
        if m and item.sampling.greedy:
            kw.update(return_logprob=True, logprob_start_len=len(tokens) - m, top_logprobs_num=1)
        elif m:
            kw.update(self._dense_kwargs(tokens, m))
        return [kw]

    def _tags(self, seq_id: str, n_logits: int, deadline: float | None) -> dict[str, Any]:
        return dict(rid=make_rid(seq_id, next(self._serial), n_logits), priority=deadline_priority(deadline))

    def _dense_kwargs(self, tokens: list[int], m: int) -> dict[str, Any]:
        # One placeholder token after the last real one: its input entry is the distribution after the last token,
        # so all m distributions come from the same (raw) input-logprob path.
        return dict(
            input_ids=tokens + [0],
            return_logprob=True,
            logprob_start_len=len(tokens) - m,
            top_logprobs_num=self.vocab_size,
        )

    def forward(self, items: list[WorkItem]) -> tuple[list[ItemResult], BatchStats]:
        start = time.perf_counter()
        if self._closed:
            raise RuntimeError("the SGLang backend is shut down")
        check_batch(items)
        for it in items:
            if it.n_logits and not it.sampling.greedy and self.sampling_mode == "refuse":
                raise WispError(
                    "this server's SGLang backend refuses sampling (sampling=refuse): use temperature 0, or "
                    "run it with --sglang-sampling sparse"
                )
        cached = [self.cached_len(it.seq_id) for it in items]
        full = [
            self._seqs.get(it.seq_id, [])[:c] + list(it.new_tokens)
            for it, c in zip(items, cached, strict=True)
        ]
        reqs = [self._requests(it, toks) for it, toks in zip(items, full, strict=True)]
        flat = self._run([kw for item_reqs in reqs for kw in item_reqs])
        results: list[ItemResult] = []
        sglang_cached = 0
        misses = 0
        at = 0
        for it, toks, item_reqs, c in zip(items, full, reqs, cached, strict=True):
            outs = flat[at : at + len(item_reqs)]
            at += len(item_reqs)
            meta = outs[0].get("meta_info", {})
            hit = int(meta.get("cached_tokens", 0) or 0)
            sglang_cached += hit
            # Rebuilding (rather than extending a warm prefix): the radix cache no longer held the context.
            if it.context is not None and c >= 1 and hit < c - 1 - it.n_logits:
                misses += 1
            if self._sparse(it):
                results.append(self._sparse_result(it, item_reqs, outs))
            else:
                results.append(self._result(it, outs[0]))
            self._seqs[it.seq_id] = toks
        stats = BatchStats(
            batch_size=len(items),
            new_tokens=sum(len(it.new_tokens) for it in items),
            context_tokens=sum(cached),
            max_context=max(cached, default=0),
            cache_misses=misses,
            forward_s=time.perf_counter() - start,
        )
        self._drain_timings()
        return results, stats

    def _run(self, requests: list[dict]) -> list[dict]:
        """Submit requests together on the engine's loop (SGLang batches them) and wait for all answers."""
        fut = asyncio.run_coroutine_threadsafe(self._submit(requests), self._loop)
        return fut.result(timeout=self.timeout_s)

    async def _submit(self, requests: list[dict]) -> list[dict]:
        return list(await asyncio.gather(*(self.engine.async_generate(**kw) for kw in requests)))

    def _sparse_result(self, item: WorkItem, reqs: list[dict], outs: list[dict]) -> ItemResult:
        probs = [
            output_probs(out, kw.get("token_ids_logprob") or []) for kw, out in zip(reqs, outs, strict=True)
        ]
        target = SGLangSparseTarget(
            self,
            item.seq_id,
            item.sampling,
            item.deadline,
            prefixes=[kw["input_ids"] for kw in reqs],
            probs=probs,
            samples=[output_token(out) for out in outs],
        )
        return ItemResult(item.seq_id, [], sparse=target)

    def draw(
        self, seq_id: str, prefix: list[int], sampling: Sampling, n: int, deadline: float | None = None
    ) -> list[int]:
        """`n` independent draws from p after `prefix` (the sparse residual's retries): n one-token requests,
        ordered in SGLang's queue by the round's deadline like its forward."""
        reqs = [position_request(prefix, sampling, [], self._warpers) for _ in range(n)]
        for kw in reqs:
            kw.update(self._tags(seq_id, 1, deadline))
        with self._count_lock:
            self.residual_draws += n
        return [output_token(out) for out in self._run(reqs)]

    def dense_row(
        self, seq_id: str, prefix: list[int], sampling: Sampling, deadline: float | None = None
    ) -> torch.Tensor:
        """p after `prefix` over the whole vocabulary (full-vocabulary logprobs): the sparse path's fallback."""
        with self._count_lock:
            self.residual_fallbacks += 1
        log.warning(
            "sglang sparse sampling: residual draws ran out for %s; full-vocabulary p for one position (%d so far)",
            seq_id[:8],
            self.residual_fallbacks,
        )
        kw = self._dense_kwargs(prefix, 1)
        kw.update(
            sampling_params={"max_new_tokens": 1, "temperature": 0.0}, **self._tags(seq_id, 1, deadline)
        )
        (out,) = self._run([kw])
        return self._dense_probs(out, 1, sampling)[0]

    def _result(self, item: WorkItem, out: dict) -> ItemResult:
        m = item.n_logits
        if m == 0:
            return ItemResult(item.seq_id, [])
        meta = out["meta_info"]
        entries = meta.get("input_top_logprobs") or []
        if item.sampling.greedy:
            # entries[0] is the distribution before the first wanted position; 1..m-1 are wanted; then the bonus.
            rows = entries[1:m]
            if len(rows) != m - 1:
                raise RuntimeError(f"SGLang returned {len(entries)} input logprob entries, expected {m}")
            argmax = [int(row[0][1]) for row in rows]
            argmax.append(output_token(out))
            return ItemResult(item.seq_id, argmax)
        probs = self._dense_probs(out, m, item.sampling)
        return ItemResult(item.seq_id, probs.argmax(dim=-1).tolist(), probs)

    def _dense_probs(self, out: dict, m: int, sampling: Sampling) -> torch.Tensor:
        """Processed p [m, V] from a full-vocabulary request (`_dense_kwargs`)."""
        from wisp_cloud.acceptance import process_logits

        entries = out["meta_info"].get("input_top_logprobs") or []
        rows = entries[1 : m + 1]
        if len(rows) != m:
            raise RuntimeError(f"SGLang returned {len(entries)} input logprob entries, expected {m + 1}")
        logp = torch.full((m, self.vocab_size), float("-inf"), dtype=torch.float32)
        for r, row in enumerate(rows):
            if len(row) != self.vocab_size:
                raise RuntimeError(
                    f"SGLang returned {len(row)} of {self.vocab_size} logprobs: cannot sample exactly"
                )
            ids = torch.tensor([int(t[1]) for t in row], dtype=torch.long)
            vals = torch.tensor([float(t[0]) for t in row], dtype=torch.float32)
            logp[r, ids] = vals
        return process_logits(logp, sampling)

    # ---- SGLang's own timings (from the wisp plugin) ----

    def attach_estimator(self, estimator: Any) -> None:
        """Feed every batch SGLang runs (shape + measured forward seconds) into `estimator.observe`."""
        self.estimator = estimator

    def _drain_timings(self) -> None:
        try:
            with self._timings_path.open() as f:
                f.seek(self._timings_pos)
                chunk = f.read()
        except OSError:
            return
        end = chunk.rfind("\n")
        if end < 0:
            return
        self._timings_pos += len(chunk[: end + 1].encode())
        if self._timings_pos > _TIMINGS_ROTATE_BYTES:
            # Keep the file small on a long-running server: the plugin appends with O_APPEND, so after truncation
            # it writes at the new end. Lines written between the read above and this point are lost (rare, and
            # only estimator training data).
            with self._timings_path.open("r+") as f:
                f.truncate(0)
            self._timings_pos = 0
        for line in chunk[: end + 1].splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.sglang_batches.append(rec)
            if self.estimator is not None and rec.get("items"):
                from wisp_cloud.estimator import ItemShape

                shapes = [ItemShape(int(n), int(c)) for n, c in rec["items"]]
                self.estimator.observe(float(rec["forward_s"]), shapes)

    def drain_timings(self) -> list[dict]:
        """Read what the plugin reported so far (also done after every forward); returns all kept records."""
        self._drain_timings()
        return list(self.sglang_batches)

    # ---- lifecycle ----

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.engine.shutdown()
        except Exception:  # noqa: BLE001 - best effort at exit
            log.exception("SGLang engine shutdown failed")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._timings_path.unlink(missing_ok=True)

    close = shutdown
