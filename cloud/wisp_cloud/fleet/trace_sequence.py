"""One sequence of an acceptance trace (fleet/trace.py records them), as emulated devices and the simulator replay it."""

from __future__ import annotations

from typing import Any


class TraceSequence:
    """Per generated position: whether the real draft's token was the target's (`accepted`), its top-1 probability
    and entropy, and whether its second choice was (`second`: token trees; all False in a trace without it)."""

    __slots__ = ("accepted", "entropy", "second", "top1")

    def __init__(self, seq: dict[str, Any]) -> None:
        self.accepted = [bool(a) for a in seq["accepted"]]
        self.top1 = [float(x) for x in seq["top1"]]
        self.entropy = [float(x) for x in seq["entropy"]]
        self.second = [bool(a) for a in seq.get("second") or [False] * len(self.accepted)]

    def __len__(self) -> int:
        return len(self.accepted)

    def at(self, j: int) -> tuple[bool, float, float]:
        """Position j's (accepted, top1, entropy); past the traced length it wraps (a documented approximation)."""
        i = j % len(self.accepted)
        return self.accepted[i], self.top1[i], self.entropy[i]

    def second_at(self, j: int) -> bool:
        """Was the draft's second choice the target's token at position j (wrapping as `at`)?"""
        return self.second[j % len(self.accepted)]
