"""Sparse exact sampling on SGLang (`--sglang-sampling sparse`): p at named ids and draws from p, per position.

SGLang's *input* logprobs are the raw log-softmax (no temperature, no top-k/top-p), so they cannot give p at a
few ids: p's normalizer under temperature and filtering needs the whole vocabulary. Its *output* position can:

* `HFWarpers`, a SGLang custom logit processor (the engine runs with `enable_custom_logit_processor`), masks
  the logits exactly where Hugging Face's top-k/top-p warpers filter (`acceptance.warp_scores`, the code that
  defines p for every backend). SGLang then divides by the temperature and takes the softmax itself: its
  sampling distribution is p (the request asks SGLang for no top-k/top-p of its own, whose tie and
  renormalization rules differ from HF's), and its output logprobs (temperature-scaled unless
  SGLANG_RETURN_ORIGINAL_LOGPROB is set) are log p.
* So each verified position j of an item becomes one request whose input ends right before it
  (context + draft[:j]), `max_new_tokens=1`, `token_ids_logprob` = q's support at j: the output token is a
  draw from p, and p is known on q's support. The radix cache shares the context; the draft tokens are
  recomputed by each longer request (m(m+1)/2 tokens for m positions instead of m).
* `SGLangSparseTarget` answers `p_at`/`sample` from those, `draw` sends more one-token requests at a position
  (the residual's rejection loop, sparse_acceptance.py), and `dense` falls back to the full-vocabulary path.

No sglang import here: SGLang's scheduler process unpickles `HFWarpers` by reference (wisp is installed next to
it), and this module must stay cheap to import there.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import torch

from wisp_cloud.backends.base import Sampling, SparseTarget

if TYPE_CHECKING:
    from wisp_cloud.backends.sglang import SGLangBackend


class HFWarpers:
    """SGLang custom logit processor: -inf where HF's top-k/top-p (after temperature) filter, logits elsewhere.

    SGLang calls it with the output-position logits of the requests that name it and their `custom_params`
    ({"temperature", "top_k", "top_p"}), before its own temperature division and softmax.
    """

    def __call__(
        self, logits: torch.Tensor, custom_param_list: list[dict[str, Any]] | None = None
    ) -> torch.Tensor:
        from wisp_cloud.acceptance import warp_scores

        params = custom_param_list or []
        groups: dict[tuple[float, int, float], list[int]] = {}
        for row, prm in enumerate(params):
            key = (float(prm["temperature"]), int(prm["top_k"]), float(prm["top_p"]))
            groups.setdefault(key, []).append(row)
        out = logits.clone()
        for (temperature, top_k, top_p), rows in groups.items():
            idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
            warped = warp_scores(logits.index_select(0, idx), temperature, top_k, top_p)
            out.index_copy_(
                0, idx, logits.index_select(0, idx).masked_fill(torch.isneginf(warped), -math.inf)
            )
        return out

    @classmethod
    def to_str(cls) -> str:
        """SGLang's wire form of a processor (as `CustomLogitProcessor.to_str`): the class, pickled by dill."""
        import dill  # SGLang's own dependency: present wherever this backend runs

        return json.dumps({"callable": dill.dumps(cls).hex()})


def position_request(tokens: list[int], sampling: Sampling, ids: list[int], warpers: str) -> dict[str, Any]:
    """async_generate kwargs of one position: a draw from p after `tokens`, and log p at `ids` when any."""
    params: dict[str, Any] = {"max_new_tokens": 1, "temperature": sampling.temperature}
    kw: dict[str, Any] = dict(input_ids=list(tokens), sampling_params=params)
    if sampling.top_k > 0 or sampling.top_p < 1.0:
        params["custom_params"] = {
            "temperature": sampling.temperature,
            "top_k": sampling.top_k,
            "top_p": sampling.top_p,
        }
        kw["custom_logit_processor"] = warpers
    if ids:
        kw.update(return_logprob=True, token_ids_logprob=sorted(set(ids)), logprob_start_len=len(tokens) - 1)
    return kw


def output_token(out: dict) -> int:
    ids = out.get("output_ids") or [t[1] for t in out.get("meta_info", {}).get("output_token_logprobs", [])]
    if not ids:
        raise RuntimeError("SGLang returned no output token")
    return int(ids[0])


def output_probs(out: dict, ids: list[int]) -> dict[int, float]:
    """p at `ids` from an output position's `output_token_ids_logprobs` (log p, see the module docstring)."""
    if not ids:
        return {}
    rows = out.get("meta_info", {}).get("output_token_ids_logprobs") or []
    if not rows or rows[0] is None:
        raise RuntimeError("SGLang returned no output token-id logprobs")
    got = {int(t[1]): math.exp(float(t[0])) for t in rows[0]}
    missing = set(ids) - got.keys()
    if missing:
        raise RuntimeError(f"SGLang returned no logprob for ids {sorted(missing)[:5]}")
    return got


class SGLangSparseTarget(SparseTarget):
    """One sampling item's answers: per position, the prefix it follows, p at the asked ids, and one draw."""

    def __init__(
        self,
        backend: SGLangBackend,
        seq_id: str,
        sampling: Sampling,
        deadline: float | None,
        prefixes: list[list[int]],
        probs: list[dict[int, float]],
        samples: list[int],
    ) -> None:
        self.backend = backend
        self.seq_id = seq_id
        self.sampling = sampling
        self.deadline = deadline
        self.prefixes = prefixes
        self.probs = probs
        self.samples = samples

    def p_at(self, pos: int, token: int) -> float:
        try:
            return self.probs[pos][token]
        except KeyError:
            raise KeyError(f"p at token {token} was not asked for at position {pos}") from None

    def sample(self, pos: int) -> int:
        return self.samples[pos]

    def draw(self, pos: int, n: int) -> list[int]:
        return self.backend.draw(self.seq_id, self.prefixes[pos], self.sampling, n, self.deadline)

    def dense(self, pos: int) -> torch.Tensor:
        return self.backend.dense_row(self.seq_id, self.prefixes[pos], self.sampling, self.deadline)
