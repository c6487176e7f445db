"""The host sampler (wisp_cloud/host_sampler.py): a thread's stack is counted where it runs, per thread."""

from __future__ import annotations

import threading
import time

from wisp_cloud.host_sampler import HostSampler


def _spin_in_here(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(200))


def test_a_busy_thread_is_sampled_in_its_function_and_take_starts_again(tmp_path):
    stop = threading.Event()
    worker = threading.Thread(target=_spin_in_here, args=(stop,), name="busy-worker")
    worker.start()
    sampler = HostSampler(interval_s=0.002).start()
    try:
        time.sleep(0.3)
    finally:
        sampler.stop()
        stop.set()
        worker.join()
    path = sampler.dump(tmp_path, "arm")
    assert path.name == "host-001-arm.txt"
    lines = path.read_text().splitlines()
    samples = int(lines[0].split("samples=")[1].split()[0])
    assert samples >= 10
    busy = sum(int(ln.rsplit(" ", 1)[1]) for ln in lines[1:] if ln.startswith("busy-worker;"))
    spinning = sum(
        int(ln.rsplit(" ", 1)[1])
        for ln in lines[1:]
        if ln.startswith("busy-worker;") and "test_host_sampler:_spin_in_here" in ln
    )
    assert busy == samples and spinning >= 0.9 * samples  # one stack per thread per sample
    assert not any(ln.startswith("wisp-sampler") for ln in lines)  # never itself
    counts, n, _ = sampler.take()
    assert not counts and n == 0
    assert sampler.dump(tmp_path, "arm").name == "host-002-arm.txt"
