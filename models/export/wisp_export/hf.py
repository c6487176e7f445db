"""transformers helpers shared by fetch, export and parity."""

from __future__ import annotations

import logging


class _DropMistralRegexWarning(logging.Filter):
    # transformers 4.57.3+ warns "incorrect regex pattern ... fix_mistral_regex" for EVERY local folder whose
    # config says transformers_version > 4.57.2, whatever the model type. For Qwen/Llama folders it changes nothing
    # (the fix is only applied when asked for), so the warning is noise that reads like a broken tokenizer.
    def filter(self, record: logging.LogRecord) -> bool:
        return "fix_mistral_regex" not in record.getMessage()


_FILTER = _DropMistralRegexWarning()


def quiet_transformers() -> None:
    """Drop transformers' spurious warnings that would bury the progress display."""
    logger = logging.getLogger("transformers.tokenization_utils_base")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
