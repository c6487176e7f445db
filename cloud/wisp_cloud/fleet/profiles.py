"""Device and link profiles for emulated devices. Every figure says where it comes from.

Device profiles give the draft's time per decoded token and per prefilled token. `measured` ones come from
`bench/draft_speed.py` runs of our real ONNX draft (bench/results/); `published` ones are third-party figures
for phone/Jetson-class hardware, quoted with their source, and are for *other* small models (so they are
labelled with the model they were measured on). Where a published source gives no prefill rate, prefill is
derived from our measured prefill/decode ratio and labelled `derived`.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Our measured ratio prefill-ms-per-token / decode-ms-per-token (bench/results/draft_speed-q05-q8-t2.json:
# 2547 ms for 64 prompt tokens vs 309.8 ms per decoded token).
_PREFILL_RATIO = (2547.038 / 64) / 309.82


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    decode_ms: float  # draft forward per drafted token
    prefill_ms_per_token: float
    source: str
    kind: str  # measured | published | derived
    jitter: float = 0.05  # relative std-dev of each step's time

    def step_s(self, rng: random.Random, n_tokens: int = 1) -> float:
        """Seconds for feeding n tokens: one decode step, or a prefill of n."""
        base = (
            self.decode_ms if n_tokens <= 1 else self.decode_ms + self.prefill_ms_per_token * (n_tokens - 1)
        )
        return max(0.0, base * (1.0 + self.jitter * rng.gauss(0.0, 1.0))) / 1000.0


@dataclass(frozen=True)
class LinkProfile:
    name: str
    rtt_ms: float
    jitter_ms: float  # std-dev of each one-way delay's extra (half-normal)
    up_mbps: float
    down_mbps: float
    source: str

    def one_way_s(self, rng: random.Random, nbytes: int, up: bool) -> float:
        mbps = self.up_mbps if up else self.down_mbps
        extra = abs(rng.gauss(0.0, self.jitter_ms)) if self.jitter_ms else 0.0
        return (self.rtt_ms / 2 + extra) / 1000.0 + nbytes * 8 / (mbps * 1e6)


def _measured_x86() -> DeviceProfile:
    path = Path(__file__).resolve().parents[3] / "bench" / "results" / "draft_speed-q05-q8-t2.json"
    decode, prefill = 309.82, 2547.038 / 64
    if path.is_file():
        data = json.loads(path.read_text())
        run = next((r for r in data.get("runs", []) if r.get("io_binding")), None)
        if run:
            decode = float(run["ms_per_token"])
            prefill = float(run["prefill_ms"]) / max(int(run.get("prefill_tokens", 64)), 1)
    return DeviceProfile(
        "x86-2core",
        decode,
        prefill,
        "measured: bench/results/draft_speed-q05-q8-t2.json (Qwen2.5-Coder-0.5B int8 ONNX, 2 shared x86 cores, "
        "load ~5)",
        "measured",
    )


def device_profiles() -> dict[str, DeviceProfile]:
    jetson = 1000.0 / 54.1
    phone = 1000.0 / 16.6
    return {
        p.name: p
        for p in [
            DeviceProfile(
                "jetson",
                jetson,
                jetson * _PREFILL_RATIO,
                "published: Jetson Orin Nano Super 8GB, 25 W, llama.cpp CUDA, LFM2.5-1.2B: 54.1 tok/s "
                "(https://www.smolhub.com/posts/jetson-nano-super-benchmark-non-reasoning/); prefill derived",
                "published",
            ),
            DeviceProfile(
                "phone",
                phone,
                phone * _PREFILL_RATIO,
                "published: Android phone, Adreno GPU, llama.cpp OpenCL, Qwen3-1.7B Q8_0: 16.6 tok/s "
                "(https://dev.to/as1as/i-started-building-a-roguelike-rpg-powered-by-on-device-ai-4-4b2e); "
                "prefill derived",
                "published",
            ),
            DeviceProfile(
                "mac-m4",
                1000.0 / 192.0,
                1000.0 / 553.0,
                "published: Mac mini M4 16 GB, mlx_lm, Qwen3.5-0.8B Q4_K_M: 192 tok/s generation, 553 tok/s "
                "prompt (https://www.jitesh.dev/blog/qwen35-apple-silicon-benchmark.html, 2026-03-31); a faster "
                "edge than the Jetson",
                "published",
            ),
            _measured_x86(),
            DeviceProfile(
                "instant",
                0.0,
                0.0,
                "none: no draft time (tests, and to isolate the server)",
                "derived",
                jitter=0.0,
            ),
        ]
    }


def link_profiles() -> dict[str, LinkProfile]:
    return {
        p.name: p
        for p in [
            LinkProfile(
                "lan", 2.0, 0.5, 100.0, 100.0, "assumed: same-site LAN (a lower bound, not a measurement)"
            ),
            LinkProfile(
                "wifi-metro",
                20.0,
                4.0,
                20.0,
                50.0,
                "assumed setting: home broadband to an in-metro cloud region (swept in `wisp simulate`)",
            ),
            LinkProfile(
                "metro-edge",
                5.0,
                1.0,
                50.0,
                100.0,
                "assumed setting: a metro edge zone's 'single-digit millisecond latency' "
                "(https://aws.amazon.com/about-aws/global-infrastructure/localzones/), 5 ms RTT",
            ),
            LinkProfile(
                "lte",
                60.0,
                15.0,
                5.0,
                20.0,
                "assumed setting: LTE to a regional cloud (swept in `wisp simulate`)",
            ),
            LinkProfile("none", 0.0, 0.0, 1e6, 1e6, "none: loopback, no shaping"),
        ]
    }


@dataclass
class Profiles:
    device: DeviceProfile
    link: LinkProfile
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"device": asdict(self.device), "link": asdict(self.link), **self.extra}


def get_device(name: str) -> DeviceProfile:
    from wisp_sdk.errors import WispError

    profiles = device_profiles()
    if name not in profiles:
        raise WispError(f"unknown device profile {name!r} (have: {', '.join(profiles)})")
    return profiles[name]


def get_link(name: str) -> LinkProfile:
    from wisp_sdk.errors import WispError

    profiles = link_profiles()
    if name not in profiles:
        raise WispError(f"unknown link profile {name!r} (have: {', '.join(profiles)})")
    return profiles[name]
