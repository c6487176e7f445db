"""The verifier over real websockets on loopback, with the tiny target/draft pair and the in-process server."""

from __future__ import annotations

import asyncio
import contextlib
import secrets

import numpy as np
import pytest
from metrics_scrape import scrape_metrics
from reference import pooled_counts, target_tree
from scipy.stats import chi2, chisquare
from wisp_sdk.errors import WispError
from wisp_sdk.protocol import Close, Hello, Open, Resume, Round, SamplingParams, encode
from wisp_sdk.sampling import sparse_q
from ws_client import Client, Drafter, Generation, generate, run_round, running_server

MAX_NEW = 16


def make_prompts(n: int, seed: int = 0, lo: int = 4, hi: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 380, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


async def connect(server, backend, token: str | None = None) -> Client:
    client = await Client.connect(server.url, token=token)
    welcome = await client.hello(backend.tokenizer_fingerprint)
    assert welcome.type == "welcome", welcome
    return client


def kind(msg) -> str:
    return getattr(msg, "type", "verdict")  # Verdict is the one binary server message: it has no type field


# ---- greedy: 50 concurrent sessions, shared batches, identical to generate() ----


def test_fifty_sessions_greedy_identical_and_batched(backend, drafter, reference):
    prompts = make_prompts(50)

    async def main():
        async with running_server(backend, metrics_port=0, max_batch=64) as server:

            async def one(i: int) -> Generation:
                client = await connect(server, backend)
                try:
                    return await generate(client, drafter, prompts[i], MAX_NEW, k=i % 6)
                finally:
                    await client.aclose()

            gens = await asyncio.gather(*(one(i) for i in range(50)))
            return gens, scrape_metrics(server.metrics_port), server.stats()

    gens, metrics, stats = asyncio.run(main())
    for prompt, gen in zip(prompts, gens, strict=True):
        assert gen.tokens == reference(prompt, MAX_NEW)
    # Shared batches: most forward passes carried more than one session.
    assert metrics["wisp_verify_batch_size_count"] > metrics['wisp_verify_batch_size_bucket{le="1.0"}']
    assert max(stats["batch_sizes"]) >= 10, stats
    rounds = sum(g.rounds for g in gens)
    assert metrics["wisp_rounds_total"] == rounds
    assert metrics["wisp_accepted_tokens_total"] == sum(g.accepted for g in gens)
    assert sum(g.accepted for g in gens) > 0  # the draft agrees sometimes, so the accept path ran


def test_centralized_mode_streams_the_greedy_continuation(backend, reference):
    prompts = make_prompts(4, seed=5)

    async def one(server, prompt):
        client = await connect(server, backend)
        opened = await client.open(prompt, max_new_tokens=MAX_NEW, mode="centralized")
        tokens = [opened.next_token]
        done = opened.done
        while not done:
            msg = await client.recv()
            assert msg.type == "tokens", msg
            tokens += msg.tokens
            assert msg.committed_len == len(prompt) + len(tokens)
            done = msg.done
        await client.aclose()
        return tokens

    async def main():
        async with running_server(backend) as server:
            return await asyncio.gather(*(one(server, p) for p in prompts))

    for prompt, tokens in zip(prompts, asyncio.run(main()), strict=True):
        assert tokens == reference(prompt, MAX_NEW)


# ---- sampling: the committed continuation has the target's distribution ----

SAMPLING = SamplingParams(temperature=1.0, top_k=4)
SAMPLE_PROMPT = [5, 17, 42, 99, 123]
N_SAMPLING_RUNS = 1200


def _accept_always_tree(target_model, drafter, prompt, sp):
    """The continuation distribution a broken 'accept every draft token' verifier would produce (k=2)."""
    target = target_tree(target_model, prompt, 1, sp)
    out: dict[tuple[int, ...], float] = {}
    for (t1,), m in target.items():
        q1 = sparse_q(drafter.logits(prompt + [t1]), sp.temperature, sp.top_k, sp.top_p)
        for a, pa in zip(q1.ids.tolist(), q1.probs.tolist(), strict=True):
            q2 = sparse_q(drafter.logits(prompt + [t1, a]), sp.temperature, sp.top_k, sp.top_p)
            for b, pb in zip(q2.ids.tolist(), q2.probs.tolist(), strict=True):
                out[(t1, a, b)] = out.get((t1, a, b), 0.0) + m * pa * pb
    return out


def test_sampling_matches_target_distribution(backend, drafter, target_model):
    exact = target_tree(target_model, SAMPLE_PROMPT, 3, SAMPLING)
    assert abs(sum(exact.values()) - 1) < 1e-5

    async def main():
        async with running_server(backend) as server:
            counts: dict[tuple[int, ...], int] = {}
            seeds = iter(range(N_SAMPLING_RUNS))

            async def worker():
                client = await connect(server, backend)
                for seed in seeds:
                    sp = SAMPLING.model_copy(update={"seed": seed})
                    rng = np.random.default_rng(10_000 + seed)
                    gen = await generate(client, drafter, SAMPLE_PROMPT, 3, k=2, sampling=sp, rng=rng)
                    await client.close_session(gen.session_id)
                    assert len(gen.tokens) == 3
                    key = tuple(gen.tokens)
                    counts[key] = counts.get(key, 0) + 1
                await client.aclose()

            await asyncio.gather(*(worker() for _ in range(40)))
            return counts

    counts = asyncio.run(main())
    assert sum(counts.values()) == N_SAMPLING_RUNS
    obs, exp = pooled_counts(counts, exact, N_SAMPLING_RUNS)
    assert chisquare(obs, exp).pvalue > 1e-3, (obs, exp)

    # The statistic has the power to catch a wrong verifier: under 'accept always' its expected value at this
    # sample size is far above the critical value.
    broken = _accept_always_tree(target_model, drafter, SAMPLE_PROMPT, SAMPLING)
    b_obs, b_exp = pooled_counts({c: p * N_SAMPLING_RUNS for c, p in broken.items()}, exact, N_SAMPLING_RUNS)
    noncentral = float((((b_obs - b_exp) ** 2) / b_exp).sum())
    assert noncentral > 3 * chi2.ppf(1 - 1e-3, len(b_exp) - 1), noncentral


def test_sampling_is_reproducible_with_a_seed(backend, drafter):
    async def main():
        async with running_server(backend) as server:
            client = await connect(server, backend)
            outs = []
            for _ in range(2):
                sp = SamplingParams(temperature=0.8, top_p=0.9, seed=1234)
                gen = await generate(
                    client, drafter, SAMPLE_PROMPT, 12, k=3, sampling=sp, rng=np.random.default_rng(1)
                )
                outs.append(gen.tokens)
            await client.aclose()
            return outs

    a, b = asyncio.run(main())
    assert a == b


# ---- errors: every code, answered, with a normal session unaffected alongside ----


async def expect_error(client: Client, frame, code: str):
    await client.send_raw(frame if isinstance(frame, str | bytes) else encode(frame))
    msg = await client.recv()
    assert msg.type == "error" and msg.code.value == code, msg
    return msg


def test_every_error_code_is_answered_and_isolated(backend, drafter, reference):
    prompt = make_prompts(1, seed=9)[0]
    fault = 7

    async def main():
        async with running_server(
            backend,
            auth_tokens=frozenset({"tok-a", "tok-b"}),
            max_frame_bytes=4096,
            max_draft_len=8,
            max_context_len=200,
            max_sessions_per_token=2,
            fault_token=fault,
        ) as server:
            fp = backend.tokenizer_fingerprint
            seen = set()
            # The normal session: runs between every provocation, on a connection that also gets bad frames.
            normal = await connect(server, backend, token="tok-a")
            opened = await normal.open(prompt, max_new_tokens=MAX_NEW)
            gen = Generation(opened.session_id, [opened.next_token])

            async def step():
                if len(gen.tokens) < MAX_NEW:
                    gen.rounds += 1
                    await run_round(normal, drafter, gen, prompt, 3, SamplingParams())

            # bad_request: not JSON, unknown type, garbage binary, on the normal session's own connection.
            for frame in ("{not json", '{"type": "nope"}', b"\x01\x09garbage", b""):
                seen.add((await expect_error(normal, frame, "bad_request")).code.value)
                await step()
            # bad_request: a stale committed_len and an out-of-order round for the normal session.
            ctx = len(prompt) + len(gen.tokens)
            await expect_error(
                normal,
                Round(session_id=gen.session_id, round=gen.rounds + 1, committed_len=ctx - 1, draft_ids=[]),
                "bad_request",
            )
            await expect_error(
                normal,
                Round(session_id=gen.session_id, round=gen.rounds + 5, committed_len=ctx, draft_ids=[]),
                "bad_request",
            )
            await step()
            # bad_request: a sampling round without q, or with a q that is not a distribution.
            samp = await normal.open([5, 6, 7], max_new_tokens=4, sampling=SamplingParams(temperature=1.0))
            await expect_error(
                normal,
                Round(session_id=samp.session_id, round=1, committed_len=4, draft_ids=[9]),
                "bad_request",
            )
            bad_q = Round(
                session_id=samp.session_id,
                round=1,
                committed_len=4,
                draft_ids=[9],
                q_ids=[[9, 10]],
                q_probs=[[0.5, 0.2]],
            )
            await expect_error(normal, bad_q, "bad_request")
            assert (await normal.close_session(samp.session_id)).type == "closed"
            await step()
            # bad_request: a protocol version the server does not speak (and the connection is closed).
            c = await Client.connect(server.url, token="tok-a")
            await expect_error(c, Hello(tokenizer_fingerprint=fp, protocol_version=99), "bad_request")
            await c.aclose()
            # bad_request: anything but hello first.
            fresh = await Client.connect(server.url, token="tok-a")
            await expect_error(fresh, Open(prompt_ids=[1, 2]), "bad_request")
            await fresh.aclose()

            # unauthorized: no token, a wrong token (the connection is then closed), another token's session.
            for token in (None, "nope"):
                c = await Client.connect(server.url, token=token)
                seen.add((await expect_error(c, Hello(tokenizer_fingerprint=fp), "unauthorized")).code.value)
                await c.aclose()
            other = await connect(server, backend, token="tok-b")
            await expect_error(
                other,
                Round(session_id=gen.session_id, round=gen.rounds + 1, committed_len=ctx, draft_ids=[]),
                "unauthorized",
            )
            seen.add("unauthorized")
            await step()
            # Hello.auth_token works for clients that cannot set headers.
            c = await Client.connect(server.url)
            assert (await c.hello(fp, auth_token="tok-b")).type == "welcome"
            await c.aclose()

            # tokenizer_mismatch
            c = await Client.connect(server.url, token="tok-a")
            seen.add(
                (
                    await expect_error(
                        c, Hello(tokenizer_fingerprint="sha256:" + "0" * 64), "tokenizer_mismatch"
                    )
                ).code.value
            )
            await c.aclose()
            await step()

            # too_large: a frame over max_frame_bytes, a draft over max_draft_len, a prompt over the context limit.
            seen.add(
                (
                    await expect_error(normal, '{"type":"hello","pad":"' + "x" * 5000 + '"}', "too_large")
                ).code.value
            )
            ctx = len(prompt) + len(gen.tokens)
            await expect_error(
                normal,
                Round(session_id=gen.session_id, round=gen.rounds + 1, committed_len=ctx, draft_ids=[5] * 9),
                "too_large",
            )
            await expect_error(other, Open(prompt_ids=[5] * 250), "too_large")
            await step()

            # unknown_session
            seen.add(
                (
                    await expect_error(other, Close(session_id=secrets.token_hex(16)), "unknown_session")
                ).code.value
            )
            await expect_error(
                other,
                Round(session_id=secrets.token_hex(16), round=1, committed_len=3, draft_ids=[1]),
                "unknown_session",
            )

            # overloaded: tok-b may hold two sessions.
            b1 = await other.open([5, 6, 7], max_new_tokens=4)
            b2 = await other.open([5, 6, 8], max_new_tokens=4)
            assert b1.type == b2.type == "opened"
            seen.add((await expect_error(other, Open(prompt_ids=[5, 6, 9]), "overloaded")).code.value)
            assert (await other.close_session(b1.session_id)).type == "closed"
            assert (await other.open([5, 6, 9], max_new_tokens=4)).type == "opened"  # room again
            await step()

            # internal: a draft carrying the debug fault token fails inside the batch, for this round only;
            # the round is not applied, and the client simply resends it.
            ctx = len(prompt) + len(gen.tokens)
            err = await expect_error(
                normal,
                Round(session_id=gen.session_id, round=gen.rounds + 1, committed_len=ctx, draft_ids=[fault]),
                "internal",
            )
            assert err.session_id == gen.session_id and err.round == gen.rounds + 1
            seen.add("internal")
            while len(gen.tokens) < MAX_NEW:
                await step()
            seen.add("bad_request")
            await normal.aclose()
            await other.aclose()
            return gen, seen, server.stats()

    gen, seen, stats = asyncio.run(main())
    assert seen == {
        "bad_request",
        "unauthorized",
        "too_large",
        "unknown_session",
        "tokenizer_mismatch",
        "overloaded",
        "internal",
    }
    assert gen.tokens == reference(prompt, MAX_NEW)


def test_non_loopback_without_tokens_is_refused(backend):
    async def main():
        async with running_server(backend, host="0.0.0.0"):
            pass

    with pytest.raises(WispError, match="without auth tokens"):
        asyncio.run(main())


# ---- sessions: eviction, expiry, resume, idempotent rounds ----


def test_evicted_sessions_resume_losslessly(backend, drafter, reference):
    prompts = make_prompts(6, seed=3, lo=30, hi=40)

    async def main():
        # A budget of ~2.5 sessions' context for 6 interleaved sessions: every round may find its KV evicted.
        async with running_server(
            backend, kv_budget_tokens=120, max_context_len=100, prefill_chunk=16
        ) as server:
            clients = [await connect(server, backend) for _ in prompts]
            gens = []
            for client, prompt in zip(clients, prompts, strict=True):
                opened = await client.open(prompt, max_new_tokens=MAX_NEW)
                gens.append(Generation(opened.session_id, [opened.next_token]))
            while any(len(g.tokens) < MAX_NEW for g in gens):
                for client, prompt, gen in zip(clients, prompts, gens, strict=True):
                    if len(gen.tokens) < MAX_NEW:
                        gen.rounds += 1
                        await run_round(client, drafter, gen, prompt, 2, SamplingParams())
                assert server.store.kv_tokens() <= 120
            for c in clients:
                await c.aclose()
            return gens, server.stats()

    gens, stats = asyncio.run(main())
    assert stats["evictions"] >= 6, stats
    for prompt, gen in zip(prompts, gens, strict=True):
        assert gen.tokens == reference(prompt, MAX_NEW)


def test_resend_resume_and_rebuild_after_expiry(backend, drafter, reference):
    prompt = make_prompts(1, seed=11)[0]

    async def main():
        async with running_server(backend, session_ttl_s=0.3) as server:
            client = await connect(server, backend)
            opened = await client.open(prompt, max_new_tokens=MAX_NEW)
            gen = Generation(opened.session_id, [opened.next_token])
            gen.rounds = 1
            ctx = prompt + gen.tokens
            round1 = Round(
                session_id=gen.session_id,
                round=1,
                committed_len=len(ctx),
                draft_ids=drafter.draft_greedy(ctx, 3),
            )
            v1 = await client.request(round1)
            # The same round again, on the same connection: the same verdict, not applied twice.
            assert await client.request(round1) == v1
            gen.tokens += round1.draft_ids[: v1.accepted] + [v1.next_token]
            # A reconnect: resume, learn the last answered round, resend it, get the same verdict.
            await client.aclose()
            client = await connect(server, backend)
            resumed = await client.resume(gen.session_id)
            assert (resumed.type, resumed.last_round, resumed.committed_len) == (
                "resumed",
                1,
                v1.committed_len,
            )
            assert await client.request(round1) == v1
            gen.rounds += 1
            await run_round(client, drafter, gen, prompt, 3, SamplingParams())
            # Idle past the TTL: the server forgets the session; the client rebuilds it from its committed tokens.
            await asyncio.sleep(1.6)
            assert (await client.resume(gen.session_id)).code.value == "unknown_session"
            reopened = await client.open(prompt, committed_ids=gen.tokens, max_new_tokens=MAX_NEW)
            assert reopened.committed_len == len(prompt) + len(gen.tokens) + 1
            gen = Generation(reopened.session_id, gen.tokens + [reopened.next_token])
            while len(gen.tokens) < MAX_NEW:
                gen.rounds += 1
                await run_round(client, drafter, gen, prompt, 3, SamplingParams())
            await client.aclose()
            return gen, server.stats()

    gen, stats = asyncio.run(main())
    assert stats["expired"] == 1
    assert gen.tokens == reference(prompt, MAX_NEW)


# ---- transport: TLS ----


def test_tls(backend, drafter, reference, tmp_path):
    import ssl

    from ws_client import self_signed_cert

    cert, key = self_signed_cert(tmp_path)
    prompt = make_prompts(1, seed=13)[0]

    async def main():
        async with running_server(backend, tls_cert=str(cert), tls_key=str(key)) as server:
            assert server.url.startswith("wss://")
            ctx = ssl.create_default_context(cafile=str(cert))
            client = await Client.connect(server.url, ssl_ctx=ctx)
            assert (await client.hello(backend.tokenizer_fingerprint)).type == "welcome"
            gen = await generate(client, drafter, prompt, MAX_NEW, k=4)
            await client.aclose()
            return gen

    assert asyncio.run(main()).tokens == reference(prompt, MAX_NEW)


def test_kv_memory_is_accounted_and_freed(backend):
    async def main():
        async with running_server(backend) as server:
            client = await connect(server, backend)
            before = backend.kv_bytes()
            opened = await client.open(list(range(3, 43)), max_new_tokens=8)
            assert backend.kv_bytes(opened.session_id) == 40 * backend.bytes_per_token
            assert backend.kv_bytes() == before + 40 * backend.bytes_per_token
            await client.close_session(opened.session_id)
            assert backend.kv_bytes(opened.session_id) == 0
            await client.aclose()

    asyncio.run(main())


def test_rounds_survive_drops_duplicates_and_closes_in_flight(backend, drafter, reference):
    prompts = make_prompts(3, seed=21)

    async def main():
        async with running_server(backend) as server:
            # 1. The connection drops right after a round is sent: resume, resend, get exactly one application.
            client = await connect(server, backend)
            opened = await client.open(prompts[0], max_new_tokens=MAX_NEW)
            gen = Generation(opened.session_id, [opened.next_token], rounds=1)
            ctx = prompts[0] + gen.tokens
            r1 = Round(
                session_id=gen.session_id,
                round=1,
                committed_len=len(ctx),
                draft_ids=drafter.draft_greedy(ctx, 4),
            )
            await client.send(r1)
            await client.aclose()
            client = await connect(server, backend)
            resumed = await client.resume(gen.session_id)
            assert (
                resumed.last_round in (0, 1)
                and resumed.committed_len in (len(ctx), None)
                or resumed.last_round == 1
            )
            v1 = await client.request(r1)
            assert v1.round == 1 and v1.committed_len == len(ctx) + v1.accepted + 1
            gen.tokens += r1.draft_ids[: v1.accepted] + [v1.next_token]
            # 2. The same round sent twice back to back: every verdict that comes back is the same one.
            gen.rounds = 2
            ctx = prompts[0] + gen.tokens
            r2 = Round(
                session_id=gen.session_id,
                round=2,
                committed_len=len(ctx),
                draft_ids=drafter.draft_greedy(ctx, 3),
            )
            await client.send(r2)
            await client.send(r2)
            await client.send(Resume(session_id=gen.session_id))
            verdicts, resumed = [], None
            while resumed is None or not verdicts:
                msg = await client.recv()
                if kind(msg) == "resumed":
                    resumed = msg
                else:
                    verdicts.append(msg)
            with contextlib.suppress(TimeoutError):
                verdicts.append(
                    await client.recv(timeout=0.3)
                )  # a second answer may come: the cached verdict
            assert all(v == verdicts[0] for v in verdicts), (resumed, verdicts, v1)
            gen.tokens += r2.draft_ids[: verdicts[0].accepted] + [verdicts[0].next_token]
            assert verdicts[0].committed_len == len(prompts[0]) + len(gen.tokens)
            while len(gen.tokens) < MAX_NEW:
                gen.rounds += 1
                await run_round(client, drafter, gen, prompts[0], 3, SamplingParams())
            # 3. Closed while its round is in flight: closed, nothing answered for it, its KV freed.
            other = await client.open(prompts[1], max_new_tokens=MAX_NEW)
            ctx = prompts[1] + [other.next_token]
            await client.send(
                Round(session_id=other.session_id, round=1, committed_len=len(ctx), draft_ids=[5, 6])
            )
            await client.send(Close(session_id=other.session_id))
            msgs = [await client.recv()]
            if kind(msgs[0]) != "closed":
                msgs.append(await client.recv())
            assert kind(msgs[-1]) == "closed" and [kind(m) for m in msgs[:-1]] in ([], ["verdict"]), msgs
            # The server goes on serving: a fresh session on the same connection is exact.
            third = await generate(client, drafter, prompts[2], MAX_NEW, k=2)
            await asyncio.sleep(0.1)
            assert backend.cached_len(other.session_id) == 0
            await client.aclose()
            return gen, third

    gen, third = asyncio.run(main())
    assert gen.tokens == reference(prompts[0], MAX_NEW)
    assert third.tokens == reference(prompts[2], MAX_NEW)


def test_bytes_per_token_with_a_perfect_draft(backend, tiny_target, reference):
    """Wire cost when the draft always agrees (the target drafting for itself): one 92-byte round per 5 tokens."""
    perfect = Drafter(tiny_target)
    prompt = make_prompts(1, seed=17)[0]

    async def main():
        async with running_server(backend) as server:
            client = await connect(server, backend)
            gen = await generate(client, perfect, prompt, 41, k=4)
            await client.close_session(gen.session_id)
            await client.aclose()
            return client, gen

    client, gen = asyncio.run(main())
    assert gen.tokens == reference(prompt, 41)
    total = client.bytes_sent + client.bytes_received
    round_bytes = gen.rounds * (30 + 4 * 4 + 52)  # Round with k=4, and its Verdict (docs/protocol.md)
    print(
        f"\nperfect draft, greedy k=4: {total / len(gen.tokens):.1f} bytes/token with the handshake, "
        f"{round_bytes / (len(gen.tokens) - 1):.1f} in steady state ({len(gen.tokens)} tokens, {gen.rounds} rounds)"
    )
    assert round_bytes < total < round_bytes + 1500  # the rest is hello/welcome/open/opened/close/closed


def test_centralized_resume_and_close_mid_stream(backend, reference):
    prompt = make_prompts(1, seed=23)[0]

    async def main():
        async with running_server(backend) as server:
            client = await connect(server, backend)
            opened = await client.open(prompt, max_new_tokens=MAX_NEW, mode="centralized")
            first = await client.recv()
            assert kind(first) == "tokens"
            await client.aclose()  # drop mid-stream: the server keeps decoding
            await asyncio.sleep(0.2)
            client = await connect(server, backend)
            resumed = await client.resume(opened.session_id)
            replay = await client.recv()  # every generated token so far, in one frame
            assert kind(replay) == "tokens" and replay.committed_len == len(prompt) + len(replay.tokens)
            assert replay.tokens[0] == opened.next_token and replay.committed_len >= resumed.committed_len
            tokens, done = list(replay.tokens), replay.done
            while not done:
                msg = await client.recv()
                if msg.committed_len > len(prompt) + len(tokens):  # keep only what we lack
                    tokens += msg.tokens[len(tokens) + len(prompt) - msg.committed_len :]
                done = msg.done
            # A second centralized session, closed while it streams: answered with closed, nothing after.
            other = await client.open(prompt, max_new_tokens=MAX_NEW, mode="centralized")
            await client.send(Close(session_id=other.session_id))
            while kind(msg := await client.recv()) != "closed":
                assert kind(msg) == "tokens"
            with contextlib.suppress(TimeoutError):
                extra = await client.recv(timeout=0.3)
                raise AssertionError(f"frame after closed: {extra}")
            assert server.store.get(other.session_id) is None
            await client.aclose()
            return tokens

    assert asyncio.run(main()) == reference(prompt, MAX_NEW)
