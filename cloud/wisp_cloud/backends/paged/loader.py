"""Loading a decoder LM for the paged engine: dtype, weights (a folder or random ones from a config), and the
modules the engine calls (embedding, projections, norms, MLP, rotary tables, lm_head), found once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: Any, device: torch.device | str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (auto, float32, bfloat16, float16)")
    return _DTYPES[dtype]


def from_config(config: Any, dtype: torch.dtype, device: torch.device):
    """A model with random weights, built directly on `device` (an 8B model in seconds on a GPU)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        for key in ("dtype", "torch_dtype"):  # transformers 5 says dtype; 4.57 takes both
            try:
                model = AutoModelForCausalLM.from_config(config, **{key: dtype})
                break
            except TypeError:
                continue
        else:  # pragma: no cover
            model = AutoModelForCausalLM.from_config(config)
    return model.to(device=device, dtype=dtype)


def from_pretrained(path: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    for key in ("dtype", "torch_dtype"):
        try:
            model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **{key: dtype})
            break
        except TypeError:
            continue
    else:  # pragma: no cover
        model = AutoModelForCausalLM.from_pretrained(path)
    return model.to(device=device, dtype=dtype)


@dataclass
class Layer:
    in_norm: torch.nn.Module
    post_norm: torch.nn.Module
    q_proj: torch.nn.Module
    k_proj: torch.nn.Module
    v_proj: torch.nn.Module
    o_proj: torch.nn.Module
    q_norm: torch.nn.Module | None
    k_norm: torch.nn.Module | None
    mlp: torch.nn.Module
    swiglu: bool  # mlp is down(silu(gate(x)) * up(x)) with those attribute names
    # GPU path: q|k|v and gate|up as single matrices (the modules' weights become views into them)
    qkv_w: torch.Tensor | None = None
    qkv_b: torch.Tensor | None = None
    gate_up_w: torch.Tensor | None = None


def norm_eps(norm: torch.nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(norm, name, None)
        if isinstance(v, (int, float)):
            return float(v)
    return 1e-6


@dataclass
class ModelParts:
    embed: torch.nn.Module
    final_norm: torch.nn.Module
    lm_head: torch.nn.Module
    rotary: torch.nn.Module
    layers: list[Layer]
    n_q_heads: int
    n_kv_heads: int
    hidden: int
    head_dim: int
    scaling: float


def resolve_modules(m: Any) -> ModelParts:
    """The decoder's modules and shapes, found on an HF causal LM (Qwen2, Llama and kin)."""
    core = getattr(m, "model", None)
    if core is None or not hasattr(core, "layers"):
        core = getattr(m, "base_model", None)
    if core is None or not hasattr(core, "layers"):
        raise NotImplementedError(
            f"{type(m).__name__}: no decoder layers found (expected model.model.layers)"
        )
    embed = core.embed_tokens
    final_norm = core.norm
    lm_head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else m.lm_head
    rotary = getattr(core, "rotary_emb", None)
    if rotary is None:
        rotary = getattr(core.layers[0].self_attn, "rotary_emb", None)
    if rotary is None:
        raise NotImplementedError(f"{type(m).__name__}: no rotary embedding module found")

    cfg = m.config
    cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    n_q_heads = int(cfg.num_attention_heads)
    n_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or n_q_heads)
    hidden = int(cfg.hidden_size)
    attn0 = core.layers[0].self_attn
    head_dim = int(getattr(attn0, "head_dim", None) or getattr(cfg, "head_dim", None) or hidden // n_q_heads)
    scaling = float(getattr(attn0, "scaling", None) or head_dim**-0.5)
    act = str(getattr(cfg, "hidden_act", "") or getattr(cfg, "hidden_activation", "")).lower()
    layers: list[Layer] = []
    for layer in core.layers:
        attn = layer.self_attn
        if getattr(attn, "sliding_window", None):
            raise NotImplementedError("sliding-window attention is not supported by the paged backend")
        mlp = layer.mlp
        layers.append(
            Layer(
                in_norm=layer.input_layernorm,
                post_norm=layer.post_attention_layernorm,
                q_proj=attn.q_proj,
                k_proj=attn.k_proj,
                v_proj=attn.v_proj,
                o_proj=attn.o_proj,
                q_norm=getattr(attn, "q_norm", None),
                k_norm=getattr(attn, "k_norm", None),
                mlp=mlp,
                swiglu=act in ("silu", "swish")
                and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")),
            )
        )
    return ModelParts(
        embed, final_norm, lm_head, rotary, layers, n_q_heads, n_kv_heads, hidden, head_dim, scaling
    )


def fuse_linears(mods: list[torch.nn.Module]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One [sum(out), in] weight (and bias) for several Linear layers; each module's weight (and bias)
    becomes a view into it, so HF's own forward still works and no memory is duplicated."""
    if not all(isinstance(getattr(m, "weight", None), torch.Tensor) for m in mods):
        return None, None
    biases = [getattr(m, "bias", None) for m in mods]
    has_bias = [b is not None for b in biases]
    if any(has_bias) and not all(has_bias):
        return None, None
    w = torch.cat([m.weight for m in mods], 0)
    b = torch.cat(biases, 0) if all(has_bias) else None
    off = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(w[off : off + n], requires_grad=False)
        if b is not None:
            m.bias = torch.nn.Parameter(b[off : off + n], requires_grad=False)
        off += n
    return w, b


def fuse(layer: Layer) -> None:
    """GPU path: q|k|v and gate|up as single matrices (one GEMM each)."""
    if layer.q_norm is None and layer.k_norm is None:
        layer.qkv_w, layer.qkv_b = fuse_linears([layer.q_proj, layer.k_proj, layer.v_proj])
    if layer.swiglu and getattr(layer.mlp.gate_proj, "bias", None) is None:
        layer.gate_up_w, _ = fuse_linears([layer.mlp.gate_proj, layer.mlp.up_proj])
