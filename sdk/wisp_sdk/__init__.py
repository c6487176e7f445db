"""WISP edge SDK: draft on the device, verify in the cloud. Never imports torch."""

from wisp_sdk.bundle import DraftManifest, load_manifest, tokenizer_fingerprint
from wisp_sdk.errors import ProtocolError, ServerError, WispError
from wisp_sdk.protocol import SLO, SamplingParams

__all__ = [
    "SLO",
    "AsyncEdgeClient",
    "Controller",
    "DraftManifest",
    "DraftRunner",
    "DraftToken",
    "EdgeClient",
    "FixedK",
    "GenerationResult",
    "GenerationStats",
    "LinkState",
    "ProtocolError",
    "RejectionPredictor",
    "RoundStats",
    "SamplingParams",
    "ServerError",
    "Wisp",
    "WispError",
    "load_manifest",
    "make_controller",
    "tokenizer_fingerprint",
]
__version__ = "0.1.0"

# The heavier pieces (onnxruntime, tokenizers) load on first use, so that `import wisp_sdk` (and the cloud,
# which imports the protocol from here) stays light.
_LAZY = {
    "AsyncEdgeClient": "wisp_sdk.client",
    "EdgeClient": "wisp_sdk.client",
    "GenerationResult": "wisp_sdk.client",
    "Controller": "wisp_sdk.controllers",
    "FixedK": "wisp_sdk.controllers",
    "Wisp": "wisp_sdk.controllers",
    "LinkState": "wisp_sdk.controllers",
    "make_controller": "wisp_sdk.controllers",
    "DraftRunner": "wisp_sdk.draft_runner",
    "DraftToken": "wisp_sdk.draft_runner",
    "RejectionPredictor": "wisp_sdk.predictor",
    "GenerationStats": "wisp_sdk.stats",
    "RoundStats": "wisp_sdk.stats",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wisp_sdk' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
