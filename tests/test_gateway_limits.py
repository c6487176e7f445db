"""Hostile networks: bounded work per connection before and after Hello, typed errors for every malformed frame,
unforgeable logs, byte limits, and failed opens that free their slot. Real websockets over loopback against the
real gateway and engine; the model is `FakeBackend` (nothing here is about the model)."""

from __future__ import annotations

import asyncio
import logging
import struct
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from wisp_cloud.backends.fake import FAKE_FINGERPRINT, FakeBackend
from wisp_cloud.config import ServerConfig
from wisp_cloud.server import WispServer
from wisp_sdk.protocol import (
    SUBPROTOCOL,
    Hello,
    Open,
    Round,
    SamplingParams,
    decode_server,
    encode,
    encode_round,
)


class Srv:
    def __init__(self, **cfg) -> None:
        self.server = WispServer(FakeBackend(1000), ServerConfig(port=0, **cfg))

    async def __aenter__(self) -> WispServer:
        await self.server.start()
        return self.server

    async def __aexit__(self, *exc) -> None:
        await self.server.stop()


async def _ws(server: WispServer):
    return await connect(server.url, subprotocols=[SUBPROTOCOL], compression=None, max_size=None)


async def _hello(ws, client: str = "test") -> None:
    await ws.send(encode(Hello(tokenizer_fingerprint=FAKE_FINGERPRINT, client=client)))
    assert decode_server(await ws.recv()).type == "welcome"


async def _closed_within(ws, seconds: float) -> int | None:
    """The close code if the server closed the connection within `seconds` (reading what it sent first)."""
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            await asyncio.wait_for(ws.recv(), max(0.01, end - time.monotonic()))
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else -1
    except TimeoutError:
        return None
    return None


def test_no_hello_is_closed_at_the_deadline():
    async def main():
        async with Srv(hello_timeout_s=0.3) as server:
            ws = await _ws(server)
            return await _closed_within(ws, 3.0)

    assert asyncio.run(main()) == 1008


def test_frames_before_hello_are_not_decoded_and_repeated_bad_frames_close():
    async def main():
        async with Srv(max_bad_frames=5) as server:
            ws = await _ws(server)
            await ws.send(b"\x01\x01\x00" + b"\x00" * 40)  # a binary frame before Hello
            first = decode_server(await ws.recv())
            for _ in range(10):
                await ws.send(b"garbage!!!")  # answered with errors, then the connection is closed
            return first, await _closed_within(ws, 3.0)

    first, code = asyncio.run(main())
    assert first.type == "error" and first.code.value == "bad_request" and "hello first" in first.message
    assert code is not None  # cut (a flood gets no closing handshake: the connection is dropped)


def test_a_pre_hello_flood_is_cut_and_neighbours_keep_their_latency():
    """D1/D2: sockets that flood invalid frames before Hello (reconnecting when cut) cost the server a few frames
    each, never a decode or a traceback; a normal client's rounds stay within 3x their baseline latency (plus a
    little absolute slack: the flooders run in this test's own event loop)."""

    async def round_trip_ms(server) -> float:
        ws = await _ws(server)
        await _hello(ws)
        await ws.send(encode(Open(prompt_ids=[1, 2, 3], max_new_tokens=400)))
        opened = decode_server(await ws.recv())
        ctx = [1, 2, 3, opened.next_token]
        t0 = time.perf_counter()
        for rnd in range(1, 41):
            msg = Round(session_id=opened.session_id, round=rnd, committed_len=len(ctx), draft_ids=[])
            await ws.send(encode_round(msg))
            ctx.append(decode_server(await ws.recv()).next_token)
        took = (time.perf_counter() - t0) * 1000 / 40
        await ws.close()
        return took

    async def flood(server, stop: asyncio.Event, counts: list[int]) -> None:
        while not stop.is_set():
            try:
                ws = await _ws(server)
                while not stop.is_set():
                    await ws.send(b"\x00" * 10)
                    counts[0] += 1
                    if counts[0] % 8 == 0:
                        await asyncio.sleep(0)
            except ConnectionClosed:
                counts[1] += 1  # cut by the server: reconnect and go on

    async def main():
        async with Srv() as server:
            base = min([await round_trip_ms(server) for _ in range(3)])
            stop = asyncio.Event()
            counts = [0, 0]
            tasks = [asyncio.create_task(flood(server, stop, counts)) for _ in range(2)]
            await asyncio.sleep(0.5)
            loaded = min([await asyncio.wait_for(round_trip_ms(server), 30) for _ in range(3)])
            stop.set()
            for task in tasks:  # a flooder may be blocked in a send the server no longer reads
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return base, loaded, counts

    base, loaded, (frames, cuts) = asyncio.run(main())
    assert cuts > 0 and frames > 100  # the flood ran, and the server kept cutting it
    # the flooders share this test's event loop with the server and the neighbour: a little absolute slack
    assert loaded <= max(3 * base, base + 15.0), (base, loaded)


def test_connection_caps_per_address():
    async def main():
        async with Srv(max_connections_per_ip=3) as server:
            socks = [await _ws(server) for _ in range(3)]
            for ws in socks:
                await _hello(ws)
            extra = await _ws(server)
            code = await _closed_within(extra, 3.0)
            for ws in socks:
                await ws.close()
            await asyncio.sleep(0.1)
            again = await _ws(server)
            await _hello(again)  # a slot is free again
            await again.close()
            return code

    assert asyncio.run(main()) == 1013


def test_per_address_cap_uses_the_forwarded_address_only_from_a_trusted_proxy():
    """Behind a balancer (`wisp cluster`: HAProxy `option forwardfor`, replicas `--trusted-proxy 127.0.0.1`) the
    per-address cap counts each client, not the balancer; from anyone else X-Forwarded-For is ignored."""

    async def fwd(server: WispServer, client: str):
        return await connect(
            server.url,
            subprotocols=[SUBPROTOCOL],
            compression=None,
            additional_headers={"X-Forwarded-For": f"203.0.113.9, {client}"},
        )

    async def run(trusted: frozenset[str]) -> list[int | None]:
        async with Srv(max_connections_per_ip=2, trusted_proxies=trusted) as server:
            held = [await fwd(server, "10.0.0.1"), await fwd(server, "10.0.0.1")]
            for ws in held:
                await _hello(ws)
            same, other = await fwd(server, "10.0.0.1"), await fwd(server, "10.0.0.2")
            codes = [await _closed_within(same, 1.0), await _closed_within(other, 1.0)]
            for ws in (*held, same, other):
                await ws.close()
            return codes

    assert asyncio.run(run(frozenset({"127.0.0.1"}))) == [1013, None]  # per client behind the proxy
    assert asyncio.run(run(frozenset())) == [1013, 1013]  # untrusted: the TCP peer's address, shared


async def _http_get(
    server: WispServer, path: str = "/health"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain-HTTP keep-alive connection to the serve port, after one answered request."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def _status(reader: asyncio.StreamReader) -> int:
    line = await asyncio.wait_for(reader.readline(), 3.0)
    return int(line.split()[1])


def test_http_connections_count_against_the_caps():
    """--max-connections covers the serve port's plain HTTP too: a flood of idle keep-alive HTTP connections (or
    health checks) cannot hold descriptors past the cap, and they hold the websockets' slots while open."""

    async def main():
        async with Srv(max_connections=2) as server:
            held = [await _http_get(server) for _ in range(2)]
            assert [await _status(r) for r, _ in held] == [200, 200]  # keep-alive: both still open
            ws = await _ws(server)
            ws_code = await _closed_within(ws, 3.0)  # no slot left for a websocket
            r3, w3 = await _http_get(server)
            refused = await _status(r3)  # nor for a third HTTP connection
            w3.close()
            for _, w in held:
                w.close()
            await asyncio.sleep(0.2)
            r4, w4 = await _http_get(server)
            again = await _status(r4)  # the slots are free again
            w4.close()
            return ws_code, refused, again

    assert asyncio.run(main()) == (1013, 503, 200)


@pytest.mark.parametrize(
    "frame",
    [
        "[" * 50000,  # deep nesting
        '{"type":"open","prompt_ids":[' + "9" * 5000 + "]}",  # a huge integer
        '{"type":"open","prompt_ids":[]}',  # a model constraint
        '{"type":"open","prompt_ids":[1],"sampling":{"temperature":-1}}',
    ],
)
def test_every_malformed_frame_is_bad_request_without_a_traceback(frame, caplog):
    async def main():
        async with Srv() as server:
            ws = await _ws(server)
            await _hello(ws)
            await ws.send(frame)
            err = decode_server(await ws.recv())
            # a binary round whose committed_len is 0 (a model constraint inside the binary codec)
            rnd = bytearray(
                encode_round(Round(session_id="ab" * 16, round=1, committed_len=5, draft_ids=[1]))
            )
            struct.pack_into("<i", rnd, 3 + 16 + 4, 0)
            await ws.send(bytes(rnd))
            err2 = decode_server(await ws.recv())
            await ws.close()
            return err, err2

    with caplog.at_level(logging.INFO):
        err, err2 = asyncio.run(main())
    assert err.code.value == "bad_request" and err2.code.value == "bad_request", (err, err2)
    assert "Traceback" not in caplog.text and "internal" not in err.message


def test_text_frame_limit_counts_bytes():
    async def main():
        async with Srv(max_frame_bytes=4000) as server:
            ws = await _ws(server)
            await _hello(ws)
            await ws.send('{"type":"close","session_id":"' + "é" * 1500 + '"}')  # 1.5 k characters, 3 kB+
            ok = decode_server(await ws.recv())
            await ws.send('{"type":"close","session_id":"' + "€" * 1500 + '"}')  # 1.5 k characters, 4.5 kB
            big = decode_server(await ws.recv())
            await ws.close()
            return ok, big

    ok, big = asyncio.run(main())
    assert ok.code.value != "too_large"
    assert big.code.value == "too_large" and "bytes" in big.message


def test_log_lines_cannot_be_forged(caplog):
    async def main():
        async with Srv() as server:
            ws = await _ws(server)
            await _hello(ws, client="evil\nINFO wisp.server: session_open session=forged")
            await ws.close()

    with caplog.at_level(logging.INFO, logger="wisp.server"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "wisp.server"]
    assert not any(line.startswith("session_open") for line in lines)
    assert all("\n" not in line for line in lines)


def test_tiny_temperature_and_oversized_q_are_refused_and_leave_no_session():
    async def main():
        async with Srv() as server:
            ws = await _ws(server)
            await _hello(ws)
            await ws.send(encode(Open(prompt_ids=[1, 2], sampling=SamplingParams(temperature=1e-40))))
            err = decode_server(await ws.recv())
            sessions_after = len(server.store)
            await ws.send(encode(Open(prompt_ids=[1, 2], sampling=SamplingParams(temperature=0.8, seed=1))))
            opened = decode_server(await ws.recv())
            ctx = [1, 2, opened.next_token]
            q_ids = [list(range(300))]
            q_probs = [[1 / 300] * 300]
            msg = Round(
                session_id=opened.session_id,
                round=1,
                committed_len=len(ctx),
                draft_ids=[0],
                q_ids=q_ids,
                q_probs=q_probs,
            )
            await ws.send(encode_round(msg))
            err_q = decode_server(await ws.recv())
            await ws.close()
            return err, sessions_after, err_q

    err, sessions_after, err_q = asyncio.run(main())
    assert err.code.value == "bad_request" and "temperature" in err.message
    assert sessions_after == 0
    assert err_q.code.value == "bad_request" and "64 entries" in err_q.message


def test_health_ready_and_metrics_on_the_serve_port():
    import urllib.error
    import urllib.request

    def get(url: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""

    async def main():
        async with Srv() as server:
            base = f"http://127.0.0.1:{server.port}"
            health = await asyncio.to_thread(get, base + "/health")
            ready = await asyncio.to_thread(get, base + "/ready")
            metrics = await asyncio.to_thread(get, base + "/metrics")
            other = await asyncio.to_thread(get, base + "/")
            server.gateway.draining = True
            draining = await asyncio.to_thread(get, base + "/ready")
            ws = await _ws(server)  # the websocket upgrade still works on the same port
            await _hello(ws)
            await ws.close()
            return health, ready, metrics, other, draining

    health, ready, metrics, other, draining = asyncio.run(main())
    assert health == (200, "ok\n") and ready == (200, "ready\n")
    assert metrics[0] == 200 and "wisp_sessions" in metrics[1]
    assert other[0] == 426 and draining[0] == 503


def test_drain_finishes_rounds_in_flight_refuses_opens_then_closes_1001():
    async def main():
        server = WispServer(FakeBackend(1000, base_s=0.3), ServerConfig(port=0))
        await server.start()
        ws = await _ws(server)
        await _hello(ws)
        await ws.send(encode(Open(prompt_ids=[1, 2, 3], max_new_tokens=50)))
        opened = decode_server(await ws.recv())
        msg = Round(session_id=opened.session_id, round=1, committed_len=4, draft_ids=[7, 8])
        await ws.send(encode_round(msg))  # in flight (the fake forward takes 0.3 s) when the drain starts
        await asyncio.sleep(0.05)
        drain = asyncio.create_task(server.drain(5.0))
        await asyncio.sleep(0.05)
        await ws.send(encode(Open(prompt_ids=[4, 5], max_new_tokens=5)))
        answers = [decode_server(await ws.recv()) for _ in range(2)]
        await drain
        ready = server.gateway.ready()
        await server.stop()
        code = await _closed_within(ws, 3.0)
        return answers, ready, code

    answers, ready, code = asyncio.run(main())
    kinds = sorted(type(a).__name__ for a in answers)
    assert kinds == ["Error", "Verdict"], answers  # the round in flight was answered; the new open refused
    err = next(a for a in answers if type(a).__name__ == "Error")
    assert err.code.value == "overloaded" and "draining" in err.message
    assert not ready and code == 1001


def test_the_outbox_is_bounded_and_pushes_back():
    """D1 after Hello: answers queued for a client that does not read stop its reader at half the outbox, and a
    client that still lets `outbox_frames` answers pile up is cut (before: an unbounded queue). Unit-level on
    `Connection`: over loopback the kernel's socket buffers swallow megabytes before the outbox ever fills."""
    from wisp_cloud.gateway import Connection

    class Transport:
        aborted = False

        def abort(self) -> None:
            self.aborted = True

    class Socket:  # the websocket's part the outbox touches
        transport = Transport()

    async def main():
        conn = Connection(Socket(), None, "peer", outbox_frames=8)  # type: ignore[arg-type]
        flags = []
        for i in range(20):
            conn.send(b"x%d" % i)
            flags.append(conn.writable.is_set())
        return conn, flags

    conn, flags = asyncio.run(main())
    assert flags[:4] == [True] * 4 and not flags[4]  # the reader pauses past half the outbox
    assert conn.overflowed and Socket.transport.aborted and conn.outbox.qsize() == 8


def test_a_bad_frame_flood_logs_a_bounded_number_of_lines(caplog):
    """D2: each refused frame is answered, but the log gets at most 20 lines a second (plus one line counting
    the rest), and never a traceback. (Before: one line per frame, and a traceback per decode error.)"""

    async def main():
        async with Srv(max_bad_frames=10_000) as server:
            ws = await _ws(server)
            await _hello(ws)
            t0 = time.monotonic()
            for _ in range(600):
                await ws.send('{"type":"close","session_id":"nope"')  # not JSON
            answers = [decode_server(await ws.recv()) for _ in range(600)]
            await ws.close()
            await asyncio.sleep(1.1)
            await _hello(await _ws(server))  # a later event flushes the suppressed count
            return answers, time.monotonic() - t0

    with caplog.at_level(logging.INFO, logger="wisp.server"):
        answers, took = asyncio.run(main())
    assert all(a.code.value == "bad_request" for a in answers)
    lines = [r.getMessage() for r in caplog.records if r.name == "wisp.server"]
    errors = [ln for ln in lines if ln.startswith("error_frame")]
    assert 0 < len(errors) <= 20 * (int(took) + 2)
    assert "Traceback" not in caplog.text
