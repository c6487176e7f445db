"""What admission control sees of a session: its steady-state demand (`SessionLoad`), from the live session or from
the `Open` that asks for a new one."""

from __future__ import annotations

from wisp_sdk.protocol import Open

from wisp_cloud.commit import DEFAULT_DRAFT_LEN
from wisp_cloud.sched import SessionLoad
from wisp_cloud.sessions import Session


def session_load(s: Session) -> SessionLoad:
    d = s.deadlines
    central = s.mode == "centralized"
    return SessionLoad(
        s.id,
        tpot_s=s.slo.tpot_ms / 1000.0,
        draft_len=0 if central else round(s.k_mean if s.k_mean is not None else DEFAULT_DRAFT_LEN),
        context_len=s.committed_len,
        # None until the session has a verdict: admission fills in the other sessions' median
        alpha=d.acceptance.measured_alpha if d is not None else None,
        tokens_per_round=None if d is None or central else d.acceptance.tokens_per_round,
        think_s=0.0 if central else s.think_s,
    )


def candidate_load(msg: Open, active: list[SessionLoad]) -> SessionLoad:
    """A session not opened yet: it drafts like the median active one (admission fills in the rest)."""
    known = sorted(load.draft_len for load in active if load.draft_len > 0)
    central = msg.mode == "centralized"
    context = len(msg.prompt_ids) + len(msg.committed_ids)
    return SessionLoad(
        "candidate",
        tpot_s=msg.slo.tpot_ms / 1000.0,
        draft_len=0 if central else known[len(known) // 2] if known else DEFAULT_DRAFT_LEN,
        context_len=context,
        think_s=0.0 if central else None,
        ttft_s=msg.slo.ttft_ms / 1000.0,
        prompt_len=context,
    )
