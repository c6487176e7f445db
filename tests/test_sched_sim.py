"""A tiny deterministic discrete-event driver for scheduler tests: open-loop arrivals, a fake GPU whose batch
time is exactly a reference estimator's prediction, a fake clock. No threads, no sleeping."""

from __future__ import annotations

from dataclasses import dataclass, field

from wisp_cloud.estimator import VerifyTimeEstimator
from wisp_cloud.sched import Batch, Outcome, Policy, Request, Scheduler


def linear_estimator(
    const: float = 0.005, per_item: float = 0.0005, per_token: float = 0.0002, attn: float = 0.0
) -> VerifyTimeEstimator:
    """Estimator with known coefficients: t = const·groups + per_item·B + per_token·Σnew + attn·Σn(c+n)."""
    est = VerifyTimeEstimator(features=("groups", "batch", "new", "attn"))
    est.coef = [const, per_item, per_token, attn]
    return est


@dataclass
class Trace:
    outcomes: list[Outcome] = field(default_factory=list)
    batches: list[tuple[float, Batch]] = field(default_factory=list)  # (start time, batch)
    end: float = 0.0

    def by_session(self, prefix: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.request.session_id.startswith(prefix)]

    def misses(self, prefix: str = "") -> int:
        return sum(not o.met for o in self.by_session(prefix))


def simulate(
    policy: Policy,
    requests: list[Request],
    gpu: VerifyTimeEstimator,
    max_steps: int = 100_000,
) -> Trace:
    """Run `requests` (arrivals as given) through a Scheduler; each batch takes `gpu.predict(batch)` seconds."""
    sched = Scheduler(policy, learn=False)
    pending = sorted(requests, key=lambda r: (r.arrival, r.rid))
    trace = Trace()
    now = 0.0
    i = 0
    for _ in range(max_steps):
        while i < len(pending) and pending[i].arrival <= now + 1e-12:
            sched.submit(pending[i])
            i += 1
        if i >= len(pending) and not sched.waiting:
            break
        batch = sched.next_batch(now)
        if batch is None:
            nxt = [pending[i].arrival] if i < len(pending) else []
            wake = sched.wakeup(now)
            if wake is not None:
                nxt.append(max(wake, now + 1e-9))
            assert nxt, "scheduler idles with work waiting and nothing to wake it"
            now = min(nxt)
            continue
        trace.batches.append((now, batch))
        dur = gpu.predict(batch.shapes)
        now += dur
        trace.outcomes.extend(sched.complete(batch, dur, now))
    else:
        raise AssertionError("simulation did not finish")
    trace.end = now
    return trace


def verify(sid: str, arrival: float, deadline_in: float, k: int = 4, ctx: int = 200, **kw) -> Request:
    return Request(
        sid, "verify", k + 1, ctx, deadline=arrival + deadline_in, arrival=arrival, expected_tokens=3.0, **kw
    )


def prefill(sid: str, arrival: float, tokens: int, ttft: float = 3.0) -> Request:
    return Request(sid, "prefill", tokens, 0, deadline=arrival + ttft, arrival=arrival, expected_tokens=1.0)


# ---- the driver itself ----


def test_driver_runs_fifo_batches_back_to_back():
    from wisp_cloud.sched import FifoPolicy

    gpu = linear_estimator()
    reqs = [verify(f"s{i}", 0.0, 1.0) for i in range(3)]
    trace = simulate(FifoPolicy(max_batch=2), reqs, gpu)
    assert [len(b) for _, b in trace.batches] == [2, 1]
    assert trace.batches[1][0] == trace.batches[0][0] + gpu.predict(trace.batches[0][1].shapes)
    assert len(trace.outcomes) == 3 and trace.misses() == 0


# ---- closed loop: sessions that draft, send a round, wait for the verdict, draft again ----


def closed_loop(
    policy: Policy,
    gpu: VerifyTimeEstimator,
    n_sessions: int,
    seed: int = 0,
    k: int = 4,
    alpha: float = 0.75,
    draft_s_per_token: float = 0.006,
    rtt: float = 0.02,
    out_tokens: int = 120,
    ttft: float = 1.5,
    tpots: tuple[float, ...] = (0.035, 0.15),
    long_prompt_every: int = 5,
    arrive_over: float = 5.0,
) -> dict:
    """Sessions open over `arrive_over` s (every `long_prompt_every`-th with a 2500-token prompt, the rest
    100-400), alternate between the `tpots` SLOs, draft k tokens per round and accept each with prob. alpha.
    Returns SLOMetrics.summary plus per-SLO-class attainment."""
    import heapq
    import itertools
    import random

    from wisp_cloud.deadlines import SessionDeadlines
    from wisp_cloud.slo_metrics import SLOMetrics

    rng = random.Random(seed)
    sched = Scheduler(policy, learn=False)
    metrics = SLOMetrics(started=0.0)
    seq = itertools.count()
    events: list[tuple[float, int, str, int]] = []
    sessions = {}
    for i in range(n_sessions):
        t0 = rng.uniform(0, arrive_over)
        prompt = 2500 if long_prompt_every and i % long_prompt_every == 0 else rng.randint(100, 400)
        tpot = tpots[i % len(tpots)]
        d = SessionDeadlines(ttft_s=ttft, tpot_s=tpot, t_open=t0 + rtt / 2, max_new_tokens=out_tokens)
        sessions[i] = {"prompt": prompt, "ctx": prompt, "left": out_tokens, "d": d}
        metrics.open(str(i), ttft * 1000, tpot * 1000, t0)
        heapq.heappush(events, (t0 + rtt / 2, next(seq), "open", i))
    now, running, busy_until = 0.0, None, 0.0
    while events or sched.waiting or running is not None:
        if running is None and sched.waiting:
            batch = sched.next_batch(now)
            if batch is not None:
                running, busy_until = batch, now + gpu.predict(batch.shapes)
                continue
        t_gpu = busy_until if running is not None else (sched.wakeup(now) or float("inf"))
        t_ev = events[0][0] if events else float("inf")
        if t_gpu <= t_ev:
            now = max(now, t_gpu)
            if running is None:
                continue
            batch, running = running, None
            for o in sched.complete(batch, gpu.predict(batch.shapes), now):
                i = int(o.request.session_id)
                s = sessions[i]
                if o.request.kind == "prefill":
                    s["d"].on_first_token(now)
                    got = 1
                else:
                    acc = sum(1 for _ in itertools.takewhile(lambda _: rng.random() < alpha, range(k)))
                    got = min(acc + 1, s["left"])
                    s["d"].on_round(k, acc, now)
                    metrics.round(
                        str(i), now - o.request.arrival, gpu.predict([o.request.shape(k + 1)]), o.met
                    )
                s["left"] -= got
                s["ctx"] += got
                metrics.tokens(str(i), got, now + rtt / 2)
                if s["left"] <= 0:
                    metrics.close(str(i), now + rtt / 2)
                else:
                    heapq.heappush(events, (now + rtt + draft_s_per_token * k, next(seq), "round", i))
            continue
        now, _, kind, i = heapq.heappop(events)
        s = sessions[i]
        if kind == "open":
            req = Request(str(i), "prefill", s["prompt"], 0, deadline=s["d"].prefill_deadline(), arrival=now)
        else:
            req = Request(
                str(i),
                "verify",
                k + 1,
                s["ctx"],
                deadline=s["d"].round_deadline(k),
                arrival=now,
                expected_tokens=s["d"].expected_tokens(k),
            )
        req.downlink_s = rtt / 2
        sched.submit(req)
    out = metrics.summary(now)
    for tpot in tpots:
        recs = [r for r in metrics.finished if abs(r.tpot_slo_s - tpot) < 1e-9]
        out[f"attainment_tpot{int(tpot * 1000)}"] = sum(r.attained for r in recs) / max(len(recs), 1)
    out["mean_batch"] = sched.stats.mean_batch
    return out
