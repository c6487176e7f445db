"""Fault tests: the client survives a killed server and cut connections, losing and duplicating nothing."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from cli_process import ServerProcess
from test_sdk_e2e import PROMPTS
from wisp_sdk import EdgeClient, FixedK, WispError

N_NEW = 40


class CutProxy:
    """A loopback TCP proxy whose connections the test can cut (the server stays up)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}"
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        self.drop_next_downlink = threading.Event()
        self.cuts = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.closed:
                client.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self.lock:
                self.pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downlink: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if downlink and self.drop_next_downlink.is_set():
                    # Swallow this server->client chunk (a verdict the server has already applied) and cut.
                    self.drop_next_downlink.clear()
                    self.cut()
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # shutdown() first: close() alone leaves the FIN pending while the other pump blocks in recv().
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def cut(self) -> None:
        with self.lock:
            pairs, self.pairs = self.pairs, []
            self.cuts += 1
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
        except OSError:
            pass
        self.listener.close()
        self.cut()


def _reference(client: EdgeClient, reference, prompt) -> list[int]:
    return reference(client.encode_prompt(prompt), N_NEW)


@pytest.mark.slow
def test_server_killed_and_restarted_on_the_same_port(tiny_target, tiny_bundle, reference):
    srv = ServerProcess(tiny_target)
    port = srv.port
    replacement: list[ServerProcess] = []
    try:
        with EdgeClient(srv.url, tiny_bundle, threads=1, resume_deadline_s=180, backoff_max_s=0.5) as c:
            prompt = PROMPTS[0]
            undisturbed = c.generate(prompt, max_new_tokens=N_NEW, controller=FixedK(3))
            assert undisturbed.token_ids == _reference(c, reference, prompt)
            restart = threading.Thread(target=lambda: replacement.append(ServerProcess(tiny_target, port)))
            deltas = []
            for delta in c.stream(prompt, max_new_tokens=N_NEW, controller=FixedK(3)):
                deltas.append(delta)
                if len(deltas) == 3:
                    srv.kill()  # mid-generation: rounds in flight die with it
                    restart.start()
            res = c.last_result
        restart.join(200)
        assert res is not None
        assert res.token_ids == undisturbed.token_ids
        assert res.text == undisturbed.text == "".join(deltas)
        assert res.stats.reconnects >= 1 and res.stats.reopened >= 1  # the new server had to rebuild it
    finally:
        srv.kill()
        for r in replacement:
            r.stop()


@pytest.fixture(scope="module")
def server(tiny_target):
    srv = ServerProcess(tiny_target)
    yield srv
    srv.stop()


def test_cut_connections_resume_the_same_session(server, tiny_bundle, reference):
    proxy = CutProxy(server.port)
    try:
        with EdgeClient(proxy.url, tiny_bundle, threads=1, resume_deadline_s=60) as c:
            prompt = PROMPTS[1]
            ref = _reference(c, reference, prompt)
            deltas = []
            for delta in c.stream(prompt, max_new_tokens=N_NEW, controller=FixedK(2)):
                deltas.append(delta)
                if len(deltas) in (2, 5, 8):
                    proxy.cut()
            res = c.last_result
        assert res is not None and res.token_ids == ref and "".join(deltas) == res.text
        assert res.stats.reconnects >= 1 and res.stats.reopened == 0  # resumed, never rebuilt
    finally:
        proxy.close()


def test_lost_verdict_is_recovered_from_the_servers_cache(server, tiny_bundle, reference):
    proxy = CutProxy(server.port)
    try:
        with EdgeClient(proxy.url, tiny_bundle, threads=1, resume_deadline_s=60) as c:
            prompt = PROMPTS[2]
            ref = _reference(c, reference, prompt)
            n = 0
            for _ in c.stream(prompt, max_new_tokens=N_NEW, controller=FixedK(2)):
                n += 1
                if n in (2, 6):
                    proxy.drop_next_downlink.set()  # the next verdict is applied by the server, then lost
            res = c.last_result
        assert res is not None and res.token_ids == ref
        assert res.stats.reconnects >= 1 and res.stats.reopened == 0
        assert any(r.resent for r in res.stats.rounds)
    finally:
        proxy.close()


def test_gives_up_with_a_clear_error_after_the_deadline(server, tiny_bundle):
    proxy = CutProxy(server.port)
    try:
        with EdgeClient(proxy.url, tiny_bundle, threads=1, resume_deadline_s=2.0, backoff_max_s=0.2) as c:
            t0 = time.monotonic()
            with pytest.raises(WispError, match="could not resume within"):
                for i, _ in enumerate(c.stream(PROMPTS[0], max_new_tokens=N_NEW, controller=FixedK(2))):
                    if i == 1:
                        proxy.close()  # the server is unreachable from now on
            assert time.monotonic() - t0 < 60
    finally:
        proxy.close()


def test_refused_open_is_retried_until_a_session_frees(tiny_target, tiny_bundle, reference):
    """`overloaded` is not final: the client retries on a new connection (behind a balancer, possibly another
    replica) within `overload_retry_s`; with 0 it fails at once with the server's code."""
    import asyncio

    from wisp_sdk import ServerError
    from wisp_sdk.client import AsyncEdgeClient

    srv = ServerProcess(tiny_target, 0, "--threads", "1", "--max-sessions", "1")
    holder_prompt, prompt = [5, 17, 33, 60], [7, 21, 40, 90]

    async def main():
        async with (
            AsyncEdgeClient(srv.url, tiny_bundle, threads=1) as holder,
            AsyncEdgeClient(srv.url, tiny_bundle, threads=1, overload_retry_s=0) as impatient,
            AsyncEdgeClient(
                srv.url, tiny_bundle, threads=1, overload_retry_s=60, backoff_max_s=0.2
            ) as patient,
        ):
            held = holder.stream(holder_prompt, max_new_tokens=N_NEW, controller=FixedK(2))
            await held.__anext__()  # the server's only session is taken
            with pytest.raises(ServerError) as refused:
                await impatient.generate(prompt, max_new_tokens=4)
            assert refused.value.code == "overloaded"
            waiting = asyncio.create_task(
                patient.generate(prompt, max_new_tokens=N_NEW, controller=FixedK(2))
            )
            await asyncio.sleep(0.5)
            assert not waiting.done()
            async for _ in held:  # the holder finishes and closes its session
                pass
            return await asyncio.wait_for(waiting, 60)

    try:
        res = asyncio.run(main())
    finally:
        srv.stop()
    assert res.token_ids == reference(prompt, N_NEW)
    assert res.stats.refused >= 1 and res.stats.reopened == 0
