"""SLO bookkeeping stays bounded on a long-running server (D10), and its counts stay exact."""

from __future__ import annotations

from wisp_cloud.slo_metrics import SLOMetrics


def _run(m: SLOMetrics, n: int) -> None:
    for i in range(n):
        sid = f"s{i}"
        m.open(sid, ttft_ms=100, tpot_ms=100, now=i)
        m.tokens(sid, 1, i + (0.05 if i % 2 else 0.5))  # odd sessions meet the TTFT, even ones miss it
        m.tokens(sid, 9, i + 0.6)
        m.round(sid, 0.01, 0.005, met=True)
        m.close(sid, i + 0.7)


def test_windows_are_bounded_and_counts_exact():
    bounded, full = SLOMetrics(max_finished=100, max_samples=50), SLOMetrics()
    _run(bounded, 1000)
    _run(full, 1000)
    assert len(bounded.finished) == 100 and len(bounded.verify_latency) == 50
    a, b = bounded.summary(2000.0), full.summary(2000.0)
    for key in ("sessions", "attained", "attainment", "goodput_tok_s", "throughput_tok_s", "round_misses"):
        assert a[key] == b[key], key
    assert a["sessions"] == 1000 and a["attainment"] == 0.5


def test_sample_windows_roll_instead_of_freezing():
    """D10: the round samples are the most recent ones (the old lists froze at their cap, so a server's latency
    percentiles stopped moving after 100 k rounds)."""
    m = SLOMetrics(max_samples=100)
    m.open("s", ttft_ms=100, tpot_ms=100, now=0.0)
    for i in range(1000):
        latency = 0.001 if i < 900 else 0.050  # the server got slow for the last 100 rounds
        m.round("s", latency, 0.001, met=True)
    s = m.summary(1.0, include_live=True)
    assert s["verify_p50_ms"] == 50.0 and s["inflation_mean"] == 50.0
