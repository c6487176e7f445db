"""The edge's side of one generation, sans I/O: protocol state, committed tokens, stop rules, resume decisions.

The I/O front (generation.py, driven by client.py) owns sockets, timers and the draft model; this class only
turns server messages into state changes and says what to send. The committed token list here is the single
source of truth: a token enters it exactly once (a verdict for a round that is not the one in flight is
ignored; a rebuilt session starts from exactly these tokens), which is what makes resume lossless and
duplicate-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wisp_sdk.draft_runner import DraftToken
from wisp_sdk.errors import ProtocolError
from wisp_sdk.protocol import (
    SLO,
    Close,
    Mode,
    Open,
    Opened,
    Resume,
    Resumed,
    Round,
    SamplingParams,
    Switch,
    Tokens,
    Verdict,
)
from wisp_sdk.tokenizer import DraftTokenizer, TextStream

# `offers_start_on_server`: the share of a token's TPOT budget above which the device's prompt prefill, spread over
# the generation, is worth the server's decoding while it runs.
START_ON_SERVER_SHARE = 0.1


def offers_start_on_server(
    prompt_tokens: int,
    max_new_tokens: int,
    tpot_ms: float,
    prefill_ms_per_token: float | None,
    share: float = START_ON_SERVER_SHARE,
) -> bool:
    """Should the device offer `Open.start_on_server`? The offer hides its draft's prompt prefill (P ms) behind the
    server's decoding, but the server then decodes the session's first tokens (16 at least) at one step item each,
    and the device catches its draft up on them. P costs a generation of n tokens P / (n - 1) ms a token of TPOT:
    offer where that is more than `share` of the budget. Simulated (docs/scheduling.md §12): ShareGPT prompts on a
    Mac mini (median 26 tokens, ≈ 0.05 s) cost 15-19 % of WISP's goodput offered, at 7B and TPOT 60; HumanEval
    (median 129 tokens, 24-token generations) at TPOT 30 lost half its attainment without. Unmeasured
    (`prefill_ms_per_token` None: no prefill timed yet): offer, and let the server decide."""
    if prefill_ms_per_token is None:
        return True
    return prompt_tokens * prefill_ms_per_token > share * tpot_ms * max(1, max_new_tokens - 1)


def server_decodes_next(
    previous: bool, moved_to_server: bool, handed_to_edge: bool, ended_on_edge: bool
) -> bool:
    """After a generation: offer `start_on_server` on the next one whatever the prefill rule says? A session that a
    verdict moved to server-side decoding, and that the server never handed back, says the server decodes this
    device's sessions: its regime decodes the fleet (sched/regime.py), or the device is too slow for its SLO. The
    next session would then be moved at its first verdict, after a first speculative round that waited for the
    draft's prompt prefill and drafted at the session's cost: on an H200 (7B, Mac mini, ShareGPT, TPOT 60, run 65)
    85 % of the sessions of a fleet the server decoded made that round, and they met their SLO less often than
    centralized serving's sessions (0.86 against 0.94 attainment at 520 devices). Offered, the server decodes it
    from its first token. A hand-back (`Switch`), or a generation that ended on the edge, says the server
    speculates again: back to the prefill rule. A session decoded from the start that finished before any
    hand-back says nothing new."""
    if handed_to_edge or ended_on_edge:
        return False
    return True if moved_to_server else previous


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    slo: SLO = field(default_factory=SLO)
    stop: list[str] = field(default_factory=list)
    mode: Mode = "speculative"
    # offer the server to decode the first tokens while the draft prefills the prompt (`Open.start_on_server`)
    start_on_server: bool = True


class Session:
    def __init__(
        self, request: GenerationRequest, eos_token_ids: list[int], tokenizer: DraftTokenizer
    ) -> None:
        if request.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        self.request = request
        self.eos = set(eos_token_ids)
        self.session_id: str | None = None
        self.generated: list[int] = []
        self.round_no = 0  # last round number sent in this server session
        self.inflight: Round | None = None
        self.inflight_tokens: list[DraftToken] = []
        self.done = False
        self.finish_reason = ""
        # How the session generates now: the server may switch a speculative session to centralized decoding
        # (Verdict.centralize) and back (`Switch`); a session opened centralized stays so.
        self.mode: Mode = request.mode
        self.switches = 0
        self.moved_to_server = False  # a verdict moved it to centralized decoding (`server_decodes_next`)
        self.handed_to_edge = False  # a `Switch` handed it back to the edge
        self.server_len = 0  # the server's committed_len at the last resume: Tokens must bring us up to it
        self._text = TextStream(tokenizer)
        self._emitted = 0  # characters of text handed out as deltas
        self._final_text: str | None = None

    # ---- derived ----

    @property
    def context(self) -> list[int]:
        return self.request.prompt_ids + self.generated

    @property
    def text(self) -> str:
        return self._final_text if self._final_text is not None else self._text.text

    # ---- messages to send ----

    def open_message(self) -> Open:
        """Open (or, with committed tokens, rebuild) the server session. `max_new_tokens` counts from the prompt."""
        return Open(
            prompt_ids=self.request.prompt_ids,
            committed_ids=list(self.generated),
            max_new_tokens=self.request.max_new_tokens,
            sampling=self.request.sampling,
            slo=self.request.slo,
            mode=self.request.mode,
            stop_token_ids=sorted(self.eos),
            start_on_server=self.request.start_on_server and self.request.mode == "speculative",
        )

    def make_round(self, tokens: list[DraftToken], max_siblings: int = 0) -> Round:
        """The next round of `tokens`, with the siblings of its first `max_siblings` tokens that have one."""
        if self.session_id is None or self.done:
            raise RuntimeError("no open session to send a round in")
        if self.inflight is not None:
            raise RuntimeError("a round is already in flight")
        sampling = not self.request.sampling.greedy
        self.round_no += 1
        sibs: list[int] = []
        for t in tokens[:max_siblings]:
            if t.alt is None:
                break
            sibs.append(t.alt)
        self.inflight = Round(
            session_id=self.session_id,
            round=self.round_no,
            committed_len=len(self.context),
            draft_ids=[t.token for t in tokens],
            q_ids=[t.q.ids.tolist() for t in tokens] if sampling else None,  # type: ignore[union-attr]
            q_probs=[t.q.probs.tolist() for t in tokens] if sampling else None,  # type: ignore[union-attr]
            sibling_ids=sibs,
        )
        self.inflight_tokens = list(tokens)
        return self.inflight

    def resume_message(self) -> Resume:
        if self.session_id is None:
            raise RuntimeError("no session to resume")
        return Resume(session_id=self.session_id)

    def close_message(self) -> Close | None:
        return Close(session_id=self.session_id) if self.session_id else None

    # ---- messages received ----

    def on_opened(self, msg: Opened) -> str:
        expected = len(self.context) + 1
        if msg.committed_len != expected:
            raise ProtocolError(f"opened with committed_len {msg.committed_len}, expected {expected}")
        self.session_id = msg.session_id
        self.round_no = 0
        self.inflight = None
        # a rebuilt session starts as it was asked for, unless the server took its `start_on_server` offer
        self.mode = "centralized" if msg.mode == "centralized" else self.request.mode
        self.server_len = 0
        return self._commit([msg.next_token], server_done=msg.done)

    @property
    def behind(self) -> bool:
        """Tokens the server committed that we have not seen yet (lost with a dropped link): wait for `Tokens`."""
        return len(self.context) < self.server_len

    def on_verdict(self, msg: Verdict) -> tuple[int, str] | None:
        """Apply a verdict; returns (accepted, text delta), or None for a verdict that is not for our round.

        `msg.unverified` tail tokens were never judged (the server verified a prefix); `verified(msg)` says how
        many were. A verdict with `centralize` moves the session to centralized decoding: Tokens follow."""
        rnd = self.inflight
        if rnd is None or msg.session_id != self.session_id or msg.round != rnd.round:
            return None  # a duplicate answer to a re-sent round, or a stale one: never applied twice
        verified = len(rnd.draft_ids) - msg.unverified
        sib = [rnd.sibling_ids[msg.accepted]] if msg.sibling and msg.accepted < len(rnd.sibling_ids) else []
        if (
            verified < 0
            or msg.accepted > verified
            or msg.sibling != bool(sib)
            or msg.committed_len != rnd.committed_len + msg.accepted + 1 + len(sib)
        ):
            raise ProtocolError(
                f"verdict for round {msg.round} is inconsistent: accepted {msg.accepted} of "
                f"{len(rnd.draft_ids)} ({msg.unverified} unverified), committed_len {msg.committed_len} "
                f"after {rnd.committed_len}"
            )
        self.inflight = None
        self.inflight_tokens = []
        delta = self._commit([*rnd.draft_ids[: msg.accepted], *sib, msg.next_token], server_done=msg.done)
        if msg.centralize and self.mode != "centralized":
            self.mode = "centralized"
            self.switches += 1
            self.moved_to_server = True
        return msg.accepted, delta

    def on_switch(self, msg: Switch) -> None:
        """The server hands decoding back to the edge: draft from the committed context again."""
        if msg.session_id != self.session_id:
            return
        if msg.committed_len != len(self.context):
            raise ProtocolError(
                f"switch at committed_len {msg.committed_len}, but {len(self.context)} tokens are committed"
            )
        if self.mode != "speculative":
            self.mode = "speculative"
            self.switches += 1
            self.handed_to_edge = True

    def on_tokens(self, msg: Tokens) -> str:
        """Centralized mode: tokens stream in; positions we already hold (a re-sent frame) are skipped."""
        first = msg.committed_len - len(msg.tokens)
        have = len(self.context)
        if first > have:
            raise ProtocolError(f"tokens frame starts at {first}, but only {have} tokens are committed")
        return self._commit(msg.tokens[have - first :], server_done=msg.done)

    def on_resumed(self, msg: Resumed) -> Round | None | bool:
        """After a reconnect: the round to re-send (None: nothing in flight), or False if states diverged."""
        rnd = self.inflight
        if msg.committed_len < len(self.context):
            return False
        if msg.mode != self.mode or self.mode == "centralized":
            # A centralized or switched session: the server re-sends every generated token after `Resumed`
            # (on_tokens keeps only what we lack). A round in flight when it switched was applied: those Tokens
            # hold its commit, so it is not re-sent. A switch seen here counts as one seen in its own frame
            # (`server_decodes_next` reads the flags).
            if msg.mode != self.mode:
                self.switches += 1
                if msg.mode == "centralized":
                    self.moved_to_server = True
                else:
                    self.handed_to_edge = True
            self.mode = msg.mode
            self.inflight = None
            self.inflight_tokens = []
            self.server_len = msg.committed_len
            self.round_no = msg.last_round  # the next round continues the server's count
            return None
        if rnd is None:
            return None if msg.committed_len == len(self.context) else False
        if msg.last_round == rnd.round and msg.committed_len <= rnd.committed_len + len(rnd.draft_ids) + 1:
            return rnd  # the server applied it: re-sending gets the cached verdict
        if msg.last_round == rnd.round - 1 and msg.committed_len == rnd.committed_len:
            return rnd  # it never arrived (or was never answered): send it again
        return False

    def lost(self) -> Open:
        """The server no longer knows the session: forget it and rebuild from the committed tokens."""
        self.session_id = None
        self.inflight = None
        self.inflight_tokens = []
        self.round_no = 0
        return self.open_message()

    # ---- committing ----

    def _commit(self, tokens: list[int], server_done: bool) -> str:
        stops = self.request.stop
        for tok in tokens:
            if self.done:
                break
            self.generated.append(tok)
            self._text.push([tok])
            if stops:
                cut = self._find_stop(self._text.text)
                if cut is not None:
                    self._final_text = self._text.text[:cut]
                    self._finish("stop")
                    break
            if tok in self.eos:
                self._finish("eos")
            elif len(self.generated) >= self.request.max_new_tokens:
                self._finish("length")
        if server_done and not self.done:
            # The server ended the sequence for a reason we do not see here: its context limit (HF and OpenAI
            # call that `length`), since EOS, our stop tokens and max_new_tokens are all checked above.
            self._finish("length")
        return self._take_delta()

    def _finish(self, reason: str) -> None:
        self.done = True
        self.finish_reason = reason
        if self._final_text is None:
            # Flush: text held back for an unfinished UTF-8 character is final now, whatever it decodes to.
            self._final_text = self._text.tokenizer.decode(self._text.ids)

    def _find_stop(self, text: str) -> int | None:
        # Only the tail can hold a new match: the longest stop string plus the newest token's text.
        window = max(len(s) for s in self.request.stop) + 32
        start = max(0, len(text) - window)
        hits = [i for i in (text.find(s, start) for s in self.request.stop if s) if i >= 0]
        return min(hits) if hits else None

    def _take_delta(self) -> str:
        text = self.text
        safe = len(text)
        if not self.done and self.request.stop:
            # Hold back a tail that could still grow into a stop string, so it is never streamed.
            for s in self.request.stop:
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        safe = min(safe, len(text) - n)
                        break
        safe = max(safe, self._emitted)
        delta = text[self._emitted : safe]
        self._emitted = safe
        return delta
