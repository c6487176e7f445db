"""The server's hot paths build frames without model objects: they must be byte-identical to the models' encoding."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from wisp_sdk.protocol import (
    Tokens,
    Verdict,
    decode_server,
    decode_verdict,
    encode,
    encode_verdict,
    new_session_id,
    pack_tokens,
    pack_verdict,
)

ids = st.lists(st.integers(0, 2**31 - 1), max_size=8)


@given(tokens=ids, committed=st.integers(1, 2**31 - 1), done=st.booleans())
def test_pack_tokens_is_the_models_json(tokens, committed, done):
    sid = new_session_id()
    fast = pack_tokens(sid, tokens, committed, done)
    assert fast == encode(Tokens(session_id=sid, tokens=tokens, committed_len=committed, done=done))
    assert decode_server(fast) == Tokens(session_id=sid, tokens=tokens, committed_len=committed, done=done)


@given(
    rnd=st.integers(0, 2**31 - 1),
    committed=st.integers(1, 2**31 - 1),
    accepted=st.integers(0, 64),
    nxt=st.integers(0, 2**31 - 1),
    done=st.booleans(),
    ms=st.floats(0, 1e6, width=32),
)
def test_pack_verdict_is_the_models_frame(rnd, committed, accepted, nxt, done, ms):
    sid = new_session_id()
    fast = pack_verdict(bytes.fromhex(sid), rnd, committed, accepted, nxt, done, ms, ms, ms)
    msg = Verdict(
        session_id=sid,
        round=rnd,
        committed_len=committed,
        accepted=accepted,
        next_token=nxt,
        done=done,
        queue_ms=ms,
        verify_ms=ms,
        wait_hint_ms=ms,
    )
    assert fast == encode_verdict(msg)
    assert decode_verdict(fast) == msg
