"""Session store: each session's committed tokens, round state, owner, and the KV memory budget.

The committed tokens are the truth; the backend's KV is only a cache of them. That is what makes eviction
lossless: an evicted session keeps its tokens, and its next job simply starts from an empty cache (the server
prefills the context again in chunks before verifying).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from wisp_sdk.protocol import SLO, SamplingParams, new_session_id

from wisp_cloud.acceptance import make_generator
from wisp_cloud.backends.base import Sampling
from wisp_cloud.deadlines import SessionDeadlines

if TYPE_CHECKING:
    from wisp_cloud.jobs import Job
    from wisp_cloud.replies import Peer


class SessionLimitError(Exception):
    """Too many sessions (for one token or overall): the server answers `overloaded`."""


def owner_key(token: str | None) -> str:
    """What a session remembers of its opener: a hash, so tokens never sit in memory dumps or logs."""
    return "anon" if not token else hashlib.sha256(token.encode()).hexdigest()[:16]


@dataclass(eq=False)
class Session:
    id: str
    owner: str
    tokens: list[int]  # prompt + every committed token; the last one is not yet in the KV cache
    prompt_len: int
    max_new_tokens: int
    sampling: SamplingParams
    slo: SLO
    mode: str
    stop_ids: frozenset[int]
    gen: torch.Generator
    created: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    opened: bool = False  # Opened has been produced (first token committed)
    done: bool = False
    last_round: int = 0
    last_verdict: bytes | None = None  # the last Verdict frame, re-sent as is when its round comes again
    pending: Job | None = None  # the Job in the queue or in a batch, if any
    conn: Peer | None = None  # where replies go (the latest connection that spoke for this session)
    evictions: int = 0
    deadlines: SessionDeadlines | None = None  # when each of its answers is due (set at open)
    # Scheduling statistics of its rounds (admission and wait hints): the last draft length, its EWMA, and the EWMA
    # of device time (draft + network) between an answer and the next round. None until measured.
    draft_len: int | None = None
    k_mean: float | None = None
    think_s: float | None = None
    # The load-adaptive hybrid (sched/hybrid.py): whether the server may switch this session between speculative
    # rounds and server-side decoding, how often it has, and rounds (speculative) or decoded tokens (centralized)
    # since the last switch.
    hybrid: bool = False
    # The regime (sched/regime.py): a probe keeps speculating for a while in the centralized regime, to measure;
    # `start_on_server`: its device offered to be decoded while its draft prefills the prompt (Open.start_on_server)
    probe: bool = False
    start_on_server: bool = False
    switches: int = 0
    mode_steps: int = 0
    # back from server decoding: its next round's device time also holds the draft's catch-up feed of the tokens
    # decoded meanwhile (16-256 of them), so, like a first round's prompt prefill, it is not device time to learn
    catching_up: bool = False
    sid_raw: bytes = field(init=False, repr=False)  # the id's 16 bytes, as binary frames carry it
    work_sampling: Sampling = field(init=False, repr=False)  # the backend's plain copy of `sampling`

    def __post_init__(self) -> None:
        self.sid_raw = bytes.fromhex(self.id)
        self.work_sampling = Sampling.of(self.sampling)

    @property
    def committed_len(self) -> int:
        return len(self.tokens)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    def touch(self) -> None:
        self.last_active = time.monotonic()


class SessionStore:
    """Sessions by id, with per-owner limits, TTL expiry and LRU eviction of idle sessions' KV."""

    def __init__(
        self,
        kv_budget_tokens: int,
        ttl_s: float,
        max_sessions: int,
        max_sessions_per_token: int,
        cached_len: Callable[[str], int],
        release: Callable[[str], None],
    ) -> None:
        self.kv_budget_tokens = kv_budget_tokens
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.max_sessions_per_token = max_sessions_per_token
        self._cached_len = cached_len
        self._release = release
        self._sessions: dict[str, Session] = {}
        self.evictions = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self):
        return iter(list(self._sessions.values()))

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def count_for(self, owner: str) -> int:
        return sum(1 for s in self._sessions.values() if s.owner == owner)

    def create(
        self,
        owner: str,
        prompt_ids: list[int],
        committed_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingParams,
        slo: SLO,
        mode: str,
        stop_ids: list[int],
    ) -> Session:
        if len(self._sessions) >= self.max_sessions:
            raise SessionLimitError(f"server holds its maximum of {self.max_sessions} sessions")
        if self.count_for(owner) >= self.max_sessions_per_token:
            raise SessionLimitError(
                f"this token already has {self.max_sessions_per_token} open sessions (the limit)"
            )
        sid = new_session_id()
        session = Session(
            id=sid,
            owner=owner,
            tokens=list(prompt_ids) + list(committed_ids),
            prompt_len=len(prompt_ids),
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            slo=slo,
            mode=mode,
            stop_ids=frozenset(stop_ids),
            gen=make_generator(sampling.seed),
        )
        self._sessions[sid] = session
        return session

    def remove(self, session_id: str, release: bool = True) -> Session | None:
        """Forget a session; `release=False` leaves freeing its KV to the caller (see the server's loop)."""
        session = self._sessions.pop(session_id, None)
        if session is not None and release:
            self._release(session_id)
        return session

    # ---- memory ----

    def kv_tokens(self) -> int:
        return sum(self._cached_len(sid) for sid in self._sessions)

    def make_room(self, needed: int, protect: set[str]) -> list[Session]:
        """Evict KV until `needed` more tokens fit the budget: idle sessions first (LRU), then waiting ones.

        Sessions in `protect` (the batch about to run) are never evicted. Returns the evicted sessions.
        """
        evicted: list[Session] = []
        over = self.kv_tokens() + needed - self.kv_budget_tokens
        if over <= 0:
            return evicted
        cached = [s for s in self._sessions.values() if s.id not in protect and self._cached_len(s.id) > 0]
        # Idle before waiting, least recently used first: a waiting session will need its KV soon.
        cached.sort(key=lambda s: (s.pending is not None, s.last_active))
        for session in cached:
            if over <= 0:
                break
            over -= self._cached_len(session.id)
            self._release(session.id)
            session.evictions += 1
            self.evictions += 1
            evicted.append(session)
        return evicted

    def expire(self, now: float | None = None) -> list[Session]:
        """Drop sessions idle (no job) for longer than the TTL."""
        now = time.monotonic() if now is None else now
        stale = [s for s in self._sessions.values() if s.pending is None and now - s.last_active > self.ttl_s]
        for session in stale:
            self.remove(session.id)
            self.expired += 1
        return stale
