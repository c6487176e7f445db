"""Build the SGLang stage's fixtures with the MAIN environment (.venv: transformers 4.57, optimum, onnxruntime).

    .venv/bin/python tests/sglang/build_fixtures.py OUT_DIR

Writes into OUT_DIR: `target/` and `draft/` (tiny Qwen2 HF folders), `bundle/` (the draft as an ONNX bundle for
`wisp generate`), and `reference.json`: the target's greedy continuations (transformers `generate`) and its
log-softmax rows at a few positions, which the tests in .venv-sglang (transformers 5.19) compare SGLang with.
The model folders are written by 4.57 and read by 5.19 in SGLang: `test_fixtures_read_the_same` checks that the
two versions agree on them (docs: /work/shared/MODELS.md, rope_theta pitfall).
Idempotent: a complete OUT_DIR (reference.json present) is left as it is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PROMPTS = [
    "def fibonacci(n):\n",
    "Write a function that returns the sum of a list of numbers.",
    "The quick brown fox",
    "Edge devices run a small draft model; the cloud",
]
GREEDY_NEW = 24


def main(out: Path) -> None:
    if (out / "reference.json").is_file():
        print(f"fixtures: {out} already built")
        return
    out.mkdir(parents=True, exist_ok=True)
    import torch
    from tiny_models import build_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = build_tiny_model(out / "target", arch="qwen2", seed=0)
    draft = build_tiny_model(out / "draft", seed=1, perturb_from=target)
    from wisp_export.export import export_bundle

    export_bundle(draft, out / "bundle", quant="none", check_steps=0, force=True)

    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    ref: dict = {"prompts": [], "rope_theta": model.config.rope_theta}
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = tok(prompt)["input_ids"]
            gen = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=GREEDY_NEW,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )[0, len(ids) :].tolist()
            seq = ids + gen
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), dim=-1)
            ref["prompts"].append(
                {
                    "text": prompt,
                    "ids": ids,
                    "greedy": gen,
                    # log-softmax after each of the last 6 tokens of prompt+greedy, rounded (for float compare)
                    "logp_tail": [[round(float(v), 6) for v in row] for row in logp[-6:].tolist()],
                }
            )
    (out / "reference.json").write_text(json.dumps(ref))
    print(f"fixtures: built {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
