"""Models by Hugging Face hub id (`org/name`): downloaded once into the HF cache (`HF_HUB_CACHE`), then found there,
offline too. What is fetched: the config, tokenizer, chat template and safetensors weights (no other formats)."""

from __future__ import annotations

import re
from pathlib import Path

from wisp_sdk.errors import WispError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model"]


def is_hub_id(text: str) -> bool:
    """`org/name`, and not a path someone meant (`./x/y`, `~/x`, `/x/y`: those start otherwise)."""
    return bool(_REPO_ID.match(text)) and ".." not in text


def resolve_hub(repo_id: str) -> Path:
    """The model's folder in the HF cache, downloaded if the hub is reachable; one `WispError` line otherwise."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=_FILES))
    except LocalEntryNotFoundError:
        raise WispError(
            f"{repo_id}: not in the Hugging Face cache, and the hub is unreachable (offline or HF_HUB_OFFLINE=1); "
            "fetch it once with a network, or give a model folder"
        ) from None
    except GatedRepoError:
        raise WispError(
            f"{repo_id} is gated on the Hugging Face hub: accept its terms there, then log in (HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise WispError(
            f"{repo_id}: no such model on the Hugging Face hub (or it is private: set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError as exc:
        raise WispError(f"{repo_id}: {exc}") from None
    except HfHubHTTPError as exc:
        raise WispError(f"{repo_id}: the Hugging Face hub answered: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise WispError(f"cannot download {repo_id}: {exc.strerror or exc}") from None
    if not (folder / "config.json").is_file():
        raise WispError(f"{repo_id} on the Hugging Face hub has no config.json: not a transformers model")
    return folder
