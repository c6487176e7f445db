"""The server's Prometheus text at /metrics, read back as {series: value} for the tests' assertions."""

from __future__ import annotations

import time
import urllib.request


def scrape_metrics(port: int, timeout: float = 10.0) -> dict[str, float]:
    """Every sample on http://127.0.0.1:PORT/metrics, keyed by its series as written (name and labels)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def wait_for_metric(port: int, series: str, want: float, within: float = 1.0) -> float:
    """Read `series` every 20 ms until it is `want` or `within` seconds have passed; its last value."""
    end = time.monotonic() + within
    while True:
        value = scrape_metrics(port, timeout=5.0)[series]
        if value == want or time.monotonic() > end:
            return value
        time.sleep(0.02)
