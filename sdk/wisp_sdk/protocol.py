"""The WISP wire protocol, sans I/O: message models and their encoding, nothing that touches a socket.

Control messages (hello, open, resume, close, errors, ...) are JSON text frames, validated by pydantic.
The two hot messages, `Round` (edge -> cloud) and `Verdict` (cloud -> edge), are binary frames so that a
round of k draft tokens costs ~26 + 4k bytes. Layout (little-endian):

    header   B version, B kind, H flags                                      (4 bytes)
    Round    16s session, I round, I committed_len, H n_draft,
             n_draft * i token,
             [if FLAG_SPARSE_Q] per draft position: H nnz, nnz * i id, nnz * f prob
             [if FLAG_SIBLINGS] H n_sib, n_sib * i token
    Verdict  16s session, I round, I committed_len, H accepted, i next_token,
             f queue_ms, f verify_ms, f wait_hint_ms, f price_ms, H unverified, H draft_cap, f launch_in_ms

A session's committed context is prompt + every committed token. `Opened` and each `Verdict` commit exactly
one target token (`next_token`) after any accepted draft tokens, so the edge always drafts from a context whose
last token came from the target.
"""

from __future__ import annotations

import json
import struct
from enum import Enum
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from wisp_sdk.errors import ProtocolError

# 2: the Verdict carries the server's price and how much of the draft it verified, and the server can switch a
# session to centralized decoding and back (Verdict flag, `Switch`).
# 3: the Verdict carries `launch_in_ms`, when the server's next step launches (round alignment). A Hello of an
# older version is refused with one clear error.
# 4: the Verdict carries `draft_cap`, the most draft tokens the server wants in the session's next round (the
# regime's best k under load; 0: no cap beyond the Welcome's limit).
# 5: token trees: a Round may carry `sibling_ids` (an alternative to each of its first draft tokens, verified in
# the same pass), a Verdict says when it committed one (FLAG_SIBLING), and `Limits.max_siblings` says how many the
# server verifies (0: none).
PROTOCOL_VERSION = 5
SUBPROTOCOL = (
    "wisp.v1"  # the websocket subprotocol name; the version travels in Hello and in every binary frame
)

FLAG_SPARSE_Q = 1  # Round carries the draft's sparse sampling distribution per position
FLAG_EOS = 1  # Verdict: the committed token ends the sequence (EOS or max_new_tokens reached)
FLAG_CENTRALIZE = (
    2  # Verdict: from now on the server decodes this session itself (Tokens follow; send no rounds)
)
FLAG_SIBLINGS = 2  # Round carries sibling tokens: an alternative to each of its first draft tokens
FLAG_SIBLING = 4  # Verdict: the sibling at `accepted` was committed before `next_token`

KIND_ROUND = 1
KIND_VERDICT = 2

_HEADER = struct.Struct("<BBH")
_ROUND = struct.Struct("<16sIIH")
_VERDICT = struct.Struct("<16sIIHiffffHHf")
_NNZ = struct.Struct("<H")

# How a session generates: edge drafts verified by the server, or the server decoding alone (the baseline).
Mode = Literal["speculative", "centralized"]


class ErrorCode(str, Enum):
    bad_request = "bad_request"
    unauthorized = "unauthorized"
    too_large = "too_large"
    unknown_session = "unknown_session"
    tokenizer_mismatch = "tokenizer_mismatch"
    overloaded = "overloaded"
    internal = "internal"


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingParams(_Msg):
    """temperature 0 means greedy. top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SLO(_Msg):
    """Latency targets the device asks for: time to first token and time per output token, in ms."""

    ttft_ms: float = Field(2000.0, gt=0)
    tpot_ms: float = Field(200.0, gt=0)


class Limits(_Msg):
    max_frame_bytes: int
    max_draft_len: int
    max_context_len: int
    max_sessions_per_token: int
    max_siblings: int = 0  # sibling tokens a Round may carry (protocol 5; 0: chains only)


# ---- client -> server (JSON) ----


class Hello(_Msg):
    type: Literal["hello"] = "hello"
    protocol_version: int = PROTOCOL_VERSION
    tokenizer_fingerprint: str
    auth_token: str | None = None  # for clients that cannot set an Authorization header
    client: str = "wisp-sdk"


class Open(_Msg):
    """Start a session: the server prefills prompt+committed and commits the target's next token.

    `committed_ids` is non-empty only when the edge rebuilds a session the server lost.
    """

    type: Literal["open"] = "open"
    prompt_ids: list[int] = Field(min_length=1)
    committed_ids: list[int] = Field(default_factory=list)
    max_new_tokens: int = Field(256, ge=1)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    slo: SLO = Field(default_factory=SLO)
    mode: Mode = "speculative"
    stop_token_ids: list[int] = Field(default_factory=list)
    # A speculative session may start decoded by the server while the device's draft prefills the prompt; the
    # server answers `Opened(mode="centralized")` if it takes the offer, streams `Tokens`, and hands the session to
    # the edge with `Switch` later (docs/protocol.md). Servers with `--no-regime` (or another policy) ignore it.
    start_on_server: bool = False


class Resume(_Msg):
    """Re-attach to a live session after a reconnect (same auth token as the one that opened it)."""

    type: Literal["resume"] = "resume"
    session_id: str


class Close(_Msg):
    type: Literal["close"] = "close"
    session_id: str


ClientMessage = Annotated[Hello | Open | Resume | Close, Field(discriminator="type")]

# ---- server -> client (JSON) ----


class Welcome(_Msg):
    type: Literal["welcome"] = "welcome"
    protocol_version: int = PROTOCOL_VERSION
    server: str = "wisp-cloud"
    policy: str = "fifo"
    limits: Limits


class Opened(_Msg):
    type: Literal["opened"] = "opened"
    session_id: str
    committed_len: int  # prompt + committed tokens, including next_token
    next_token: int
    done: bool = False
    prefill_ms: float = 0.0
    queue_ms: float = 0.0
    wait_hint_ms: float = 0.0
    # How the session starts: "centralized" for one opened so, or for a speculative one whose `start_on_server`
    # offer the server took (Tokens follow until a Switch hands it to the edge).
    mode: Mode = "speculative"


class Resumed(_Msg):
    """State of a resumed session; `last_round` lets the client decide whether to re-send its round.

    `mode` is how the session generates now (the server may have switched it while the link was down); a session
    that has ever been switched also gets a `Tokens` frame with every generated token after `Resumed`."""

    type: Literal["resumed"] = "resumed"
    session_id: str
    committed_len: int
    last_round: int
    mode: Mode = "speculative"


class Switch(_Msg):
    """The server hands a centralized-decoded session back to the edge: draft again from `committed_len`
    (catch the draft's KV up on the committed tokens first). The next round is `last_round + 1`. Sent after the
    last `Tokens` frame of the centralized stretch; the switch the other way is the Verdict's FLAG_CENTRALIZE."""

    type: Literal["switch"] = "switch"
    session_id: str
    mode: Literal["speculative"] = "speculative"
    committed_len: int


class Tokens(_Msg):
    """Centralized mode: target tokens streamed as the server decodes them."""

    type: Literal["tokens"] = "tokens"
    session_id: str
    tokens: list[int]
    committed_len: int
    done: bool = False


class Closed(_Msg):
    type: Literal["closed"] = "closed"
    session_id: str


class Error(_Msg):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    session_id: str | None = None
    round: int | None = None


ServerMessage = Annotated[
    Welcome | Opened | Resumed | Tokens | Switch | Closed | Error, Field(discriminator="type")
]

_client_adapter: TypeAdapter = TypeAdapter(ClientMessage)
_server_adapter: TypeAdapter = TypeAdapter(ServerMessage)

# ---- binary hot-path messages ----


class Round(_Msg):
    """Draft tokens for one verification; `q_ids/q_probs[i]` is the draft's sampling distribution at i."""

    session_id: str
    round: int = Field(ge=0)
    committed_len: int = Field(ge=1)
    draft_ids: list[int]
    q_ids: list[list[int]] | None = None
    q_probs: list[list[float]] | None = None
    # A token tree of depth one per position: sibling_ids[j] is an alternative to draft_ids[j] (greedy: the
    # draft's second choice; sampling: a second, independent draw from q_ids/q_probs[j]). At most
    # `Limits.max_siblings`, and no more than the draft tokens.
    sibling_ids: list[int] = Field(default_factory=list)


class Verdict(_Msg):
    session_id: str
    round: int
    committed_len: int  # after this verdict: previous + accepted + 1 (+ 1 more with `sibling`)
    accepted: int
    next_token: int
    done: bool = False
    queue_ms: float = 0.0
    verify_ms: float = 0.0
    wait_hint_ms: float = 0.0
    # The server's current marginal GPU cost of one verified token, in ms of others' GPU time (0 when idle): the
    # controller drafts a token only while its expected value covers its draft time plus this price.
    price_ms: float = 0.0
    # Draft tokens past the verified prefix (the server verified only draft[:k - unverified] because the tail
    # did not pay): never judged, so not a rejection. `accepted <= k - unverified`.
    unverified: int = Field(0, ge=0)
    centralize: bool = False  # FLAG_CENTRALIZE: the server decodes this session from now on
    # Predicted ms from this verdict leaving the server to the launch of the step after the one now running: the
    # earliest step a round drafted after this verdict can join (0: the GPU would be idle, a round joins when it
    # arrives). The controller drafts the tokens that fit before that launch (docs/scheduling.md §11).
    launch_in_ms: float = Field(0.0, ge=0.0)
    # The most draft tokens the server wants in the next round (0: none beyond `Limits.max_draft_len`). Under load
    # the server's regime sets it at the draft length that serves the most sessions at their SLO
    # (docs/scheduling.md §13); a longer draft is not refused, only its tail goes unverified.
    draft_cap: int = Field(0, ge=0, le=0xFFFF)
    # FLAG_SIBLING: the committed tokens are draft[:accepted], then the round's sibling_ids[accepted], then
    # next_token (the target's token after that sibling).
    sibling: bool = False


def new_session_id() -> str:
    import secrets

    return secrets.token_hex(16)


def _sid_bytes(session_id: str) -> bytes:
    try:
        raw = bytes.fromhex(session_id)
    except ValueError as exc:
        raise ProtocolError(f"session id must be 32 hex chars, got {session_id!r}") from exc
    if len(raw) != 16:
        raise ProtocolError(f"session id must be 32 hex chars, got {session_id!r}")
    return raw


def encode_round(msg: Round) -> bytes:
    sparse = msg.q_ids is not None
    flags = (FLAG_SPARSE_Q if sparse else 0) | (FLAG_SIBLINGS if msg.sibling_ids else 0)
    parts = [
        _HEADER.pack(PROTOCOL_VERSION, KIND_ROUND, flags),
        _ROUND.pack(_sid_bytes(msg.session_id), msg.round, msg.committed_len, len(msg.draft_ids)),
        np.asarray(msg.draft_ids, dtype="<i4").tobytes(),
    ]
    if sparse:
        if (
            msg.q_ids is None
            or msg.q_probs is None
            or len(msg.q_ids) != len(msg.draft_ids)
            or len(msg.q_probs) != len(msg.draft_ids)
        ):
            raise ProtocolError("q_ids and q_probs need one entry per draft token")
        for ids, probs in zip(msg.q_ids, msg.q_probs, strict=True):
            if len(ids) != len(probs):
                raise ProtocolError("q_ids and q_probs lengths differ")
            parts += [
                _NNZ.pack(len(ids)),
                np.asarray(ids, "<i4").tobytes(),
                np.asarray(probs, "<f4").tobytes(),
            ]
    if msg.sibling_ids:
        parts += [_NNZ.pack(len(msg.sibling_ids)), np.asarray(msg.sibling_ids, "<i4").tobytes()]
    return b"".join(parts)


def encode_verdict(msg: Verdict) -> bytes:
    return pack_verdict(
        _sid_bytes(msg.session_id),
        msg.round,
        msg.committed_len,
        msg.accepted,
        msg.next_token,
        msg.done,
        msg.queue_ms,
        msg.verify_ms,
        msg.wait_hint_ms,
        msg.price_ms,
        msg.unverified,
        msg.centralize,
        msg.launch_in_ms,
        msg.draft_cap,
        msg.sibling,
    )


def pack_verdict(
    sid: bytes,
    round: int,
    committed_len: int,
    accepted: int,
    next_token: int,
    done: bool,
    queue_ms: float,
    verify_ms: float,
    wait_hint_ms: float,
    price_ms: float = 0.0,
    unverified: int = 0,
    centralize: bool = False,
    launch_in_ms: float = 0.0,
    draft_cap: int = 0,
    sibling: bool = False,
) -> bytes:
    """A Verdict frame from its fields (`sid`: the 16 raw bytes): the server's hot path builds no model object."""
    flags = (
        (FLAG_EOS if done else 0) | (FLAG_CENTRALIZE if centralize else 0) | (FLAG_SIBLING if sibling else 0)
    )
    return _HEADER.pack(PROTOCOL_VERSION, KIND_VERDICT, flags) + _VERDICT.pack(
        sid,
        round,
        committed_len,
        accepted,
        next_token,
        queue_ms,
        verify_ms,
        wait_hint_ms,
        price_ms,
        unverified,
        draft_cap,
        launch_in_ms,
    )


_LAUNCH_AT = _HEADER.size + _VERDICT.size - 4  # offset of launch_in_ms in a Verdict frame


def with_launch_hint(frame: bytes, launch_in_ms: float) -> bytes:
    """The same Verdict frame with its `launch_in_ms` set: the server learns it only once its next step has
    launched, after the frame was built."""
    if len(frame) != _HEADER.size + _VERDICT.size:
        raise ProtocolError("verdict frame has the wrong size")
    return frame[:_LAUNCH_AT] + struct.pack("<f", max(0.0, launch_in_ms))


def pack_tokens(session_id: str, tokens: list[int], committed_len: int, done: bool) -> str:
    """A Tokens frame (JSON text) from its fields, byte-identical to `encode(Tokens(...))` (tested): the server's
    centralized hot path builds no model object."""
    ids = ",".join(map(str, tokens))
    flag = "true" if done else "false"
    return (
        f'{{"type":"tokens","session_id":"{session_id}","tokens":[{ids}],'
        f'"committed_len":{committed_len},"done":{flag}}}'
    )


def _read_header(data: bytes, want_kind: int) -> int:
    if len(data) < _HEADER.size:
        raise ProtocolError("binary frame shorter than its header")
    version, kind, flags = _HEADER.unpack_from(data)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"binary frame of protocol version {version}, expected {PROTOCOL_VERSION}")
    if kind != want_kind:
        raise ProtocolError(f"unexpected binary frame kind {kind}")
    return flags


def _read_count(data: bytes, off: int, item_bytes: int, what: str) -> tuple[int, int]:
    """A u16 count at `off` and the offset after it, checking that count * item_bytes bytes follow."""
    if len(data) < off + _NNZ.size:
        raise ProtocolError(f"round frame truncated in {what}")
    (n,) = _NNZ.unpack_from(data, off)
    off += _NNZ.size
    if len(data) < off + item_bytes * n:
        raise ProtocolError(f"round frame truncated in {what}")
    return n, off


def decode_round(data: bytes) -> Round:
    flags = _read_header(data, KIND_ROUND)
    off = _HEADER.size
    if len(data) < off + _ROUND.size:
        raise ProtocolError("round frame truncated")
    sid, rnd, committed, n = _ROUND.unpack_from(data, off)
    off += _ROUND.size
    end = off + 4 * n
    if len(data) < end:
        raise ProtocolError("round frame truncated in draft tokens")
    draft = np.frombuffer(data, "<i4", n, off).tolist()
    off = end
    q_ids = q_probs = None
    if flags & FLAG_SPARSE_Q:
        q_ids, q_probs = [], []
        for _ in range(n):
            nnz, off = _read_count(data, off, 8, "draft distribution")
            q_ids.append(np.frombuffer(data, "<i4", nnz, off).tolist())
            q_probs.append(np.frombuffer(data, "<f4", nnz, off + 4 * nnz).tolist())
            off += 8 * nnz
    siblings: list[int] = []
    if flags & FLAG_SIBLINGS:
        n_sib, off = _read_count(data, off, 4, "sibling tokens")
        siblings = np.frombuffer(data, "<i4", n_sib, off).tolist()
        off += 4 * n_sib
    if off != len(data):
        raise ProtocolError(f"round frame has {len(data) - off} trailing bytes")
    try:
        return Round(
            session_id=sid.hex(),
            round=rnd,
            committed_len=committed,
            draft_ids=draft,
            q_ids=q_ids,
            q_probs=q_probs,
            sibling_ids=siblings,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "frame"
        raise ProtocolError(f"invalid round ({where}: {first['msg']})") from exc


def decode_verdict(data: bytes) -> Verdict:
    flags = _read_header(data, KIND_VERDICT)
    if len(data) != _HEADER.size + _VERDICT.size:
        raise ProtocolError("verdict frame has the wrong size")
    sid, rnd, committed, accepted, nxt, queue_ms, verify_ms, wait_ms, price_ms, unverified, cap, launch_ms = (
        _VERDICT.unpack_from(data, _HEADER.size)
    )
    if not launch_ms >= 0.0:  # negative or NaN
        raise ProtocolError(f"verdict launch_in_ms must be >= 0, got {launch_ms}")
    return Verdict(
        session_id=sid.hex(),
        round=rnd,
        committed_len=committed,
        accepted=accepted,
        next_token=nxt,
        done=bool(flags & FLAG_EOS),
        queue_ms=queue_ms,
        verify_ms=verify_ms,
        wait_hint_ms=wait_ms,
        price_ms=price_ms,
        unverified=unverified,
        centralize=bool(flags & FLAG_CENTRALIZE),
        launch_in_ms=launch_ms,
        draft_cap=cap,
        sibling=bool(flags & FLAG_SIBLING),
    )


def encode(msg: BaseModel) -> str | bytes:
    """Encode any message: binary for Round/Verdict, JSON text for the rest."""
    if isinstance(msg, Round):
        return encode_round(msg)
    if isinstance(msg, Verdict):
        return encode_verdict(msg)
    return msg.model_dump_json(exclude_none=True)


def _decode_json(data: str | bytes, adapter: TypeAdapter):
    try:
        return adapter.validate_python(json.loads(data))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"frame is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ProtocolError("frame is nested too deeply") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "frame"
        raise ProtocolError(f"invalid message ({where}: {first['msg']})") from exc
    except ValueError as exc:  # e.g. an integer literal of thousands of digits
        raise ProtocolError(f"frame is not valid JSON: {exc}") from exc


def decode_client(frame: str | bytes) -> Hello | Open | Resume | Close | Round:
    """Decode a frame the server received. Raises ProtocolError on anything malformed."""
    if isinstance(frame, bytes):
        return decode_round(frame)
    return _decode_json(frame, _client_adapter)


def decode_server(
    frame: str | bytes,
) -> Welcome | Opened | Resumed | Tokens | Switch | Closed | Error | Verdict:
    """Decode a frame the client received. Raises ProtocolError on anything malformed."""
    if isinstance(frame, bytes):
        return decode_verdict(frame)
    return _decode_json(frame, _server_adapter)


def json_schema() -> dict:
    """JSON Schema of every message (binary ones described by their pydantic model), for docs and other SDKs."""
    return {
        "protocol_version": PROTOCOL_VERSION,
        "subprotocol": SUBPROTOCOL,
        "client": _client_adapter.json_schema(),
        "server": _server_adapter.json_schema(),
        "round": Round.model_json_schema(),
        "verdict": Verdict.model_json_schema(),
    }
