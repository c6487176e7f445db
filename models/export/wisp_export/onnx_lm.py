"""A minimal ONNX causal LM with a KV cache, for parity checks (the edge SDK has its own runner).

Works with optimum-onnx `text-generation-with-past` graphs: inputs `input_ids`, `attention_mask`, optional
`position_ids`, and `past_key_values.{i}.key/value` shaped [batch, kv_heads, past_len, head_dim]; outputs `logits`
and `present.{i}.key/value`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxCausalLM:
    """Batch-1 greedy decoding over an ONNX graph, keeping the KV cache between calls."""

    def __init__(self, model_path: str | Path, threads: int | None = None, spin: bool = True) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        if not spin:
            # ORT's workers busy-wait after each run; next to PyTorch in one process that starves torch's threads.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.has_position_ids = "position_ids" in inputs
        past = sorted(
            ((int(m.group(1)), m.group(2), name) for name in inputs if (m := _PAST_RE.match(name))),
            key=lambda t: (t[0], t[1] != "key"),
        )
        if not past:
            raise ValueError(
                f"{model_path}: no past_key_values inputs; export with text-generation-with-past"
            )
        self.past_names = [name for _, _, name in past]
        self.num_layers = past[-1][0] + 1
        first = inputs[self.past_names[0]]
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.kv_dtype = _ORT_DTYPES.get(first.type, np.float32)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.present_names = [n.replace("past_key_values", "present") for n in self.past_names]
        self.reset()

    def reset(self) -> None:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        self.past = dict.fromkeys(self.past_names, empty)
        self.length = 0

    def forward(self, token_ids: list[int]) -> np.ndarray:
        """Feed new tokens after the cached ones; return their logits [len(token_ids), vocab] (float32)."""
        n = len(token_ids)
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray([token_ids], dtype=np.int64),
            "attention_mask": np.ones((1, self.length + n), dtype=np.int64),
            **self.past,
        }
        if self.has_position_ids:
            feeds["position_ids"] = np.arange(self.length, self.length + n, dtype=np.int64)[None, :]
        outs = dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        self.past = {p: outs[q] for p, q in zip(self.past_names, self.present_names, strict=True)}
        self.length += n
        return outs["logits"][0].astype(np.float32)

    def greedy(
        self, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int] | None = None
    ) -> list[int]:
        """Greedy continuation of `prompt_ids` (the cache is reset first)."""
        self.reset()
        logits = self.forward(list(prompt_ids))[-1]
        out: list[int] = []
        for _ in range(max_new_tokens):
            tok = int(np.argmax(logits))
            out.append(tok)
            if eos_ids and tok in eos_ids:
                break
            logits = self.forward([tok])[-1]
        return out
