"""WISP edge SDK: draft on the device, verify in the cloud. Never imports torch."""

from wisp_sdk.bundle import DraftManifest, load_manifest, tokenizer_fingerprint
from wisp_sdk.errors import ProtocolError, ServerError, WispError

__all__ = [
    "DraftManifest",
    "ProtocolError",
    "ServerError",
    "WispError",
    "load_manifest",
    "tokenizer_fingerprint",
]
__version__ = "0.1.0"
