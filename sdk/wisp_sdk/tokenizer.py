"""The bundle's tokenizer and chat template, without transformers: `tokenizers` + jinja2.

Why an incremental decoder: a byte-level BPE token can be half of a UTF-8 character, so decoding token by token
would print replacement characters. `TextStream` decodes the whole committed sequence (from a recent safe
point) and emits only the new, complete text, which is also how stop strings are matched across token
boundaries.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wisp_sdk.errors import WispError

if TYPE_CHECKING:
    from jinja2 import Template

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _raise_exception(message: str) -> None:
    raise WispError(f"chat template: {message}")


class DraftTokenizer:
    def __init__(self, bundle_dir: str | Path) -> None:
        from tokenizers import Tokenizer

        bundle = Path(bundle_dir)
        path = bundle / "tokenizer.json"
        if not path.is_file():
            raise WispError(f"draft bundle {bundle} has no tokenizer.json")
        self._tok = Tokenizer.from_file(str(path))
        cfg_path = bundle / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template = self._load_template(bundle)
        self._compiled: Template | None = None
        self.special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def _load_template(self, bundle: Path) -> str | None:
        if (bundle / CHAT_TEMPLATE_FILE).is_file():
            return (bundle / CHAT_TEMPLATE_FILE).read_text()
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template or None

    def _token_str(self, key: str) -> str | None:
        value = self.config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else None

    def encode(self, text: str) -> list[int]:
        # The chat template already writes any special tokens, so add none here (as HF with a template does).
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the bundle's template (the same sandboxed jinja2 setup HF uses)."""
        if not self.chat_template:
            raise WispError("this draft bundle has no chat template; pass a plain prompt string instead")
        if self._compiled is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
                x, ensure_ascii=False, indent=indent
            )
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._compiled = env.from_string(self.chat_template)
        return self._compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_str("bos_token") or "",
            eos_token=self._token_str("eos_token") or "",
        )


class TextStream:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character."""

    def __init__(self, tokenizer: DraftTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        full = self.tokenizer.decode(self.ids)
        # A trailing U+FFFD means the last token ended mid-character: wait for the rest of its bytes.
        if full.endswith("\ufffd"):
            return ""
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text = full if full.startswith(self.text) else self.text
        return delta
