"""The torch side of `wisp calibrate`: the target's greedy continuations, which label the draft's guesses.

Only this module touches torch (imported lazily); the features, the fit and the manifest update live in
`wisp_sdk.calibration`, which the edge can run without torch given these traces.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def target_greedy_traces(
    target: str | Path,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """For each prompt (token ids), the target's greedy continuation (new tokens only, EOS included if hit)."""
    import torch
    from transformers import AutoModelForCausalLM

    from wisp_export.fetch import resolve_model

    path = resolve_model(target)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    out: list[list[int]] = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            gen = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=model.generation_config.pad_token_id or model.generation_config.eos_token_id,
            )
            out.append(gen[0, len(ids) :].tolist())
            if progress:
                progress(1)
    return out
