"""Random-weight targets from public architecture configs, for GPU runs where no weights can be fetched.

`wisp serve --random-config qwen2.5-7b` and `wisp profile --random-config ...` build the architecture with
random weights directly on the device. Timing is the real model's (same shapes, kernels, bytes and FLOPs);
its tokens mean nothing.

`stable_argmax`: a random model's logits are nearly flat, so at a few % of positions its top-2 gap is inside
bf16 noise and two batch shapes (a 1-token decode and a 6-token verify) pick different argmaxes. A benchmark
that replays precomputed continuations (`wisp bench`'s emulated devices) then drifts off them and every later
draft is rejected. `stable_argmax` scales the token embeddings up so the last token dominates the residual
stream, and makes each lm_head row the sum of the embeddings of the tokens mapped to it by a fixed random map
`next_token` (special tokens never chosen): the greedy next token is then `next_token[last]` with a margin of
tens of logits under any batch composition. Shapes and compute are unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _error(message: str) -> Exception:
    # imported late: bench/verify_step.py reads CONFIGS on GPU images without the SDK's dependencies
    from wisp_sdk.errors import WispError

    return WispError(message)


# Published config.json values of the architectures (no weights).
_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "use_sliding_window": False,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": {
        **_QWEN2,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "qwen2.5-7b": {
        **_QWEN2,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
    "qwen2.5-32b": {
        **_QWEN2,
        "hidden_size": 5120,
        "intermediate_size": 27648,
        "num_hidden_layers": 64,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
    "llama-3-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500_000.0,
        "vocab_size": 128256,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    },
}


def load_config(spec: str) -> Any:
    """A transformers config from a name in CONFIGS, a config.json file or a model folder holding one."""
    from transformers import AutoConfig

    if spec in CONFIGS:
        raw = dict(CONFIGS[spec])
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise _error(f"--random-config {spec}: not one of {', '.join(CONFIGS)}, nor a config.json")
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise _error(f"--random-config {spec}: {exc}") from exc
    model_type = raw.pop("model_type", None)
    if not model_type:
        raise _error(f"--random-config {spec}: no model_type")
    return AutoConfig.for_model(model_type, **raw)


def special_ids(config: Any) -> set[int]:
    ids: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(config, key, None)
        ids.update(v if isinstance(v, list) else [] if v is None else [v])
    return ids


def next_token_map(vocab: int, avoid: set[int], seed: int, allowed: int | None = None) -> Any:
    """The fixed random map last token -> next token of a stable-argmax model (never into `avoid`).

    A permutation of the ordinary ids (below `allowed`, not in `avoid`), so each lm_head row sums one embedding
    and the margin does not shrink where several tokens would share a row; the other ids map at random.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(vocab)
    ordinary = ids < min(vocab, allowed or vocab)
    if avoid:
        ordinary &= ~torch.isin(ids, torch.tensor(sorted(avoid)))
    pool = ids[ordinary]
    out = pool[torch.randint(len(pool), (vocab,), generator=g)]
    out[pool] = pool[torch.randperm(len(pool), generator=g)]
    return out


def stabilize_argmax(
    model: Any, seed: int = 0, embed_scale: float = 1000.0, allowed: int | None = None
) -> Any:
    """Make `model`'s greedy next token a fixed function of the last token (see the module doc).

    `allowed`: next tokens are drawn from ids below it (a tokenizer smaller than the embedding table).
    Returns the map (a LongTensor over the vocabulary).
    """
    import torch

    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None:
        raise _error("stable argmax needs a model with an output embedding (lm_head)")
    cfg = (
        model.config.get_text_config(decoder=True)
        if hasattr(model.config, "get_text_config")
        else model.config
    )
    nxt = next_token_map(emb.shape[0], special_ids(cfg), seed, allowed).to(emb.device)
    with torch.no_grad():
        src = emb.detach().float().clone()
        if head.weight.data_ptr() == emb.data_ptr():  # tied: give the head its own matrix
            head.weight = torch.nn.Parameter(torch.empty_like(emb), requires_grad=False)
        # row j = sum of the embeddings of tokens t with nxt[t] == j: logit_j is large iff nxt[last] == j
        rows = torch.zeros_like(src).index_add_(0, nxt, src)
        head.weight.copy_(rows.to(head.weight.dtype))
        emb.mul_(embed_scale)
    return nxt


def build_random_model(
    spec: str,
    device: str,
    dtype: Any,
    seed: int = 0,
    stable_argmax: bool = False,
    allowed: int | None = None,
) -> Any:
    """The architecture `spec` with random weights on `device` (eval mode, no grads)."""
    import torch

    from wisp_cloud.backends.paged.loader import from_config, resolve_dtype

    config = load_config(spec)
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = from_config(config, resolve_dtype(dtype, dev), dev)
    model.eval()
    if stable_argmax:
        stabilize_argmax(model, seed, allowed=allowed)
    return model


def add_random_model_args(p: Any) -> None:
    """`--random-config` and friends, shared by `wisp serve` and `wisp profile`."""
    p.add_argument(
        "--random-config",
        metavar="NAME|CONFIG",
        help=f"instead of --target: random weights of an architecture ({', '.join(CONFIGS)}, or a config.json); "
        "timing only, the tokens mean nothing",
    )
    p.add_argument(
        "--tokenizer-from",
        metavar="DIR",
        help="--random-config: the draft bundle or model folder whose tokenizer.json the clients use",
    )
    p.add_argument(
        "--stable-argmax",
        action="store_true",
        help="--random-config: make the greedy next token a fixed function of the last one, robust to bf16 "
        "noise (for benchmarks that replay precomputed continuations; docs/benchmarks.md)",
    )
    p.add_argument("--seed", type=int, default=0, help="--random-config: weight seed")


def check_model_args(args: Any) -> None:
    """Exactly one of --target / --random-config; the random-weight options only with --random-config."""
    if bool(getattr(args, "target", None)) == bool(args.random_config):
        raise _error("give either --target MODEL or --random-config NAME (random weights, for benchmarks)")
    if not args.random_config:
        for flag, value in (
            ("--stable-argmax", args.stable_argmax),
            ("--tokenizer-from", args.tokenizer_from),
        ):
            if value:
                raise _error(
                    f"{flag} goes with --random-config (a --target model has its own weights and tokenizer)"
                )


def _tokenizer_info(folder: str | None) -> tuple[str | None, int | None]:
    """(fingerprint, number of ordinary tokens) of the tokenizer.json in `folder`."""
    if not folder:
        return None, None
    from wisp_sdk.bundle import tokenizer_fingerprint

    path = Path(folder).expanduser() / "tokenizer.json"
    if not path.is_file():
        raise _error(f"--tokenizer-from {folder}: no tokenizer.json there")
    data = json.loads(path.read_text())
    vocab = data.get("model", {}).get("vocab") or {}
    return tokenizer_fingerprint(data), len(vocab) or None


def random_paged_backend(args: Any, kv_budget_tokens: int | None = None) -> Any:
    """A `PagedBackend` over `build_random_model(args.random_config, ...)` (the CLI's --random-config)."""
    from wisp_cloud.backends.paged import PagedBackend

    fp, ordinary = _tokenizer_info(getattr(args, "tokenizer_from", None))
    model = build_random_model(
        args.random_config,
        args.device,
        args.dtype,
        seed=getattr(args, "seed", 0),
        stable_argmax=bool(getattr(args, "stable_argmax", False)),
        allowed=ordinary,
    )
    return PagedBackend(
        model, args.device, args.dtype, kv_budget_tokens=kv_budget_tokens, tokenizer_fingerprint=fp
    )
