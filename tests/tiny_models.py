"""Tiny random Qwen2/Llama models with a locally trained BPE tokenizer, for fast tests.

The draft is the target with its weights perturbed, so that it agrees with the target often but not always:
acceptance is then neither 0 nor 1 and both accept and reject paths get exercised.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. A speculative decoder drafts tokens and a verifier checks them.",
    "for i in range(10):\n    print(i * i)\n",
    "import numpy as np\nx = np.arange(16).reshape(4, 4)\nprint(x.sum(axis=0))\n",
    "Edge devices run a small draft model; the cloud runs the large target model and verifies many drafts at once.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n        self.items.append(x)\n",
    "Write a function that returns the sum of a list of numbers. Explain how binary search works.",
    "Once upon a time there was a little server that verified tokens all day long and never lost one.",
]


def train_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def save_tokenizer(out_dir: Path, vocab_size: int = 384):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab_size),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "qwen2",
    seed: int = 0,
    perturb_from: str | Path | None = None,
    noise: float = 0.35,
    vocab_size: int = 384,
) -> Path:
    """Write a tiny HF model folder (config, safetensors, tokenizer, chat template) to `out_dir`.

    With `perturb_from`, copy that model and add Gaussian noise (relative to each tensor's std) to every weight.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if perturb_from is not None:
        model = AutoModelForCausalLM.from_pretrained(perturb_from, torch_dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise * (p.std() if p.numel() > 1 else 1.0))
        tok = save_tokenizer(out, vocab_size)
    else:
        tok = save_tokenizer(out, vocab_size)
        common = dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            tie_word_embeddings=False,
            torch_dtype="float32",
        )
        if arch == "qwen2":
            config = Qwen2Config(rope_theta=1_000_000.0, **common)
        elif arch == "llama":
            config = LlamaConfig(rope_theta=10_000.0, **common)
        else:
            raise ValueError(f"unknown tiny arch {arch!r}")
        model = AutoModelForCausalLM.from_config(config)
        # Sharper logits than init gives, so greedy continuations are not all near-ties.
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    return out
