"""DraftRunner: the draft model in ONNX Runtime on the device, with a KV cache that lives across rounds.

The runner caches the KV of the tokens it has fed (`tokens`). Every round the client calls `sync(context)` with
the committed context: the runner keeps the longest cached prefix that still matches (after a rejection that is
the committed length, since everything up to the last committed token was fed before), slices the cached KV
arrays down to it — no re-prefill — and feeds only the tokens it has not seen. Then `propose()` turns the logits
at the end into a draft token (with the features the controller needs) and `advance(token)` feeds it.

Why IO binding: ORT's plain `run` turns every output into a fresh numpy array and every input back into an
OrtValue. Binding the `present.*` outputs as OrtValues and feeding them straight back as the next step's
`past_key_values.*` avoids two KV-sized copies per token; only the logits come back to numpy.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wisp_sdk.bundle import DraftManifest, load_manifest
from wisp_sdk.errors import WispError
from wisp_sdk.protocol import SamplingParams
from wisp_sdk.sampling import SparseQ, confidence, sample_sparse, second_choice, sparse_q

_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


@dataclass
class DraftToken:
    """One drafted token and what the controller and verifier need to know about it."""

    token: int
    prob: float  # probability the draft gave this token under the distribution it was drawn from
    entropy: float  # entropy (nats) of the draft's untempered softmax at this position
    top1: float  # largest probability of the untempered softmax
    q: SparseQ | None = None  # sampling only: the sparse distribution the token was drawn from
    ms: float = 0.0  # time of the forward pass that produced this position's logits
    # A sibling for a token tree (`Round.sibling_ids`): greedy, the draft's second choice; sampling, a second
    # draw from `q`, independent of `token`. None when not asked for.
    alt: int | None = None


class DraftRunner:
    """An ONNX causal LM with a rollback-able KV cache (batch size 1)."""

    def __init__(
        self,
        bundle_dir: str | Path,
        threads: int | None = None,
        providers: list[Any] | None = None,
        io_binding: bool = True,
        manifest: DraftManifest | None = None,
    ) -> None:
        import onnxruntime as ort

        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest or load_manifest(self.bundle_dir)
        model_path = self.bundle_dir / self.manifest.onnx_file
        if not model_path.is_file():
            raise WispError(f"draft bundle {bundle_dir} has no {self.manifest.onnx_file}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads if threads else min(4, os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.providers = providers or ["CPUExecutionProvider"]
        self.session = _load_session(ort, model_path, opts, self.providers)
        self.io_binding = io_binding
        self._ort = ort
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self._present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        if len(self._past_names) != 2 * self.manifest.num_layers or len(self._present_names) != len(
            self._past_names
        ):
            raise WispError(
                f"{model_path} does not look like a KV-cached decoder "
                f"({len(self._past_names)} past inputs for {self.manifest.num_layers} layers)"
            )
        self._has_position_ids = "position_ids" in inputs
        self._kv_dtype = _NP_DTYPES.get(inputs[self._past_names[0]].type, np.float32)
        self.vocab_size = self.manifest.vocab_size
        self.reset()

    # ---- state ----

    def reset(self) -> None:
        """Forget every cached token."""
        shape = (1, self.manifest.num_kv_heads, 0, self.manifest.head_dim)
        self._past: list[Any] = [np.zeros(shape, self._kv_dtype) for _ in self._past_names]
        self.tokens: list[int] = []
        self._logits: np.ndarray | None = None  # next-token logits after `tokens`, when valid

    @property
    def cached_len(self) -> int:
        return len(self.tokens)

    def rollback(self, length: int) -> None:
        """Keep only the first `length` cached tokens: slice the KV, no recomputation."""
        if length >= len(self.tokens):
            return
        length = max(0, length)
        new_past = []
        for kv in self._past:
            arr = kv.numpy() if not isinstance(kv, np.ndarray) else kv
            new_past.append(np.ascontiguousarray(arr[:, :, :length, :]))
        self._past = new_past
        del self.tokens[length:]
        self._logits = None

    def sync(self, context: list[int]) -> float:
        """Make the cache hold `context` with next-token logits ready; returns the ms spent feeding tokens."""
        if not context:
            raise ValueError("context must not be empty")
        if self._logits is not None and self.tokens == context:
            return 0.0
        common = 0
        limit = min(len(self.tokens), len(context))
        while common < limit and self.tokens[common] == context[common]:
            common += 1
        # Keep at least one token to feed, since we need the logits after the last one.
        self.rollback(min(common, len(context) - 1))
        return self._feed(context[len(self.tokens) :])

    def advance(self, token: int) -> float:
        """Feed one drafted token; returns its forward time in ms."""
        return self._feed([token])

    # ---- drafting ----

    def propose(
        self, sampling: SamplingParams, rng: np.random.Generator | None = None, alt: bool = False
    ) -> DraftToken:
        """The draft token at the current end of the cache (no forward pass); with `alt`, a sibling too."""
        if self._logits is None:
            raise RuntimeError("no logits: call sync() or advance() first")
        logits = self._logits
        top1_idx, top1, ent = confidence(logits)
        if sampling.greedy:
            second = int(second_choice(logits, top1_idx)) if alt else None
            return DraftToken(token=top1_idx, prob=top1, entropy=ent, top1=top1, alt=second)
        if rng is None:
            raise ValueError("sampling needs an rng")
        q = sparse_q(logits, sampling.temperature, sampling.top_k, sampling.top_p)
        token = sample_sparse(q, rng)
        # a second draw from the same q, independent of the first: what exact tree sampling needs (acceptance.py)
        sib = sample_sparse(q, rng) if alt else None
        return DraftToken(token=token, prob=q.prob_of(token), entropy=ent, top1=top1, q=q, alt=sib)

    def draft(
        self,
        context: list[int],
        n: int,
        sampling: SamplingParams | None = None,
        rng: np.random.Generator | None = None,
    ) -> list[DraftToken]:
        """Draft `n` tokens after `context` (the simple fixed-length loop, for benchmarks and tests)."""
        sampling = sampling or SamplingParams()
        ms = self.sync(context)
        out: list[DraftToken] = []
        for i in range(n):
            tok = self.propose(sampling, rng)
            tok.ms = ms
            out.append(tok)
            if i + 1 < n:
                ms = self.advance(tok.token)
        return out

    def next_logits(self) -> np.ndarray:
        if self._logits is None:
            raise RuntimeError("no logits: call sync() or advance() first")
        return self._logits

    def teacher_forced_logits(self, tokens: list[int]) -> np.ndarray:
        """Logits [len(tokens), vocab] predicting each next token, in one forward from an empty cache."""
        self.reset()
        logits = self._run(tokens, want_all=True)
        self.tokens = list(tokens)
        self._logits = logits[-1].copy()
        return logits

    # ---- ORT ----

    def _feed(self, new_tokens: list[int]) -> float:
        if not new_tokens:
            return 0.0
        t0 = time.perf_counter()
        self._logits = self._run(new_tokens, want_all=False)
        self.tokens.extend(new_tokens)
        return (time.perf_counter() - t0) * 1000.0

    def _run(self, new_tokens: list[int], want_all: bool) -> np.ndarray:
        past_len = len(self.tokens)
        n = len(new_tokens)
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray([new_tokens], dtype=np.int64),
            "attention_mask": np.ones((1, past_len + n), dtype=np.int64),
        }
        if self._has_position_ids:
            feeds["position_ids"] = np.arange(past_len, past_len + n, dtype=np.int64)[None, :]
        if self.io_binding:
            io = self.session.io_binding()
            for name, arr in feeds.items():
                io.bind_cpu_input(name, arr)
            for name, kv in zip(self._past_names, self._past, strict=True):
                if isinstance(kv, np.ndarray):
                    io.bind_cpu_input(name, kv)
                else:
                    io.bind_ortvalue_input(name, kv)
            io.bind_output("logits", "cpu")
            for name in self._present_names:
                io.bind_output(name, "cpu")
            self.session.run_with_iobinding(io)
            outs = io.get_outputs()
            logits = outs[0].numpy()
            self._past = list(outs[1:])
        else:
            for name, kv in zip(self._past_names, self._past, strict=True):
                feeds[name] = kv.numpy() if not isinstance(kv, np.ndarray) else kv
            outs = self.session.run(["logits", *self._present_names], feeds)
            logits = outs[0]
            self._past = list(outs[1:])
        return logits[0] if want_all else logits[0, -1].copy()


def _load_session(ort: Any, model_path: Path, opts: Any, providers: list[Any]) -> Any:
    """An ONNX Runtime session, or one `WispError` line saying what is wrong with the bundle."""
    from onnxruntime.capi.onnxruntime_pybind11_state import (
        Fail,
        InvalidArgument,
        InvalidGraph,
        InvalidProtobuf,
        NoSuchFile,
    )

    try:
        return ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
    except (Fail, InvalidArgument, InvalidGraph, InvalidProtobuf, NoSuchFile) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "external data" in text.lower():
            hint = f"the bundle is incomplete: {model_path.name}'s weights file is missing; copy the whole folder"
        else:
            hint = "export the bundle again with `wisp export`"
        raise WispError(f"cannot load the draft model {model_path}: {text}; {hint}") from exc
