"""`wisp simulate`: a discrete-event model of devices, links and GPUs around the real scheduling code.

What is real (imported, not re-implemented): `scheduler.make_policy` / `Scheduler` (the batch policies, queue,
chunked prefill and wait hints), `VerifyTimeEstimator` (loaded from a `wisp profile` file; it is the policy's
estimator and, through `gpu_clock.GpuClock`, the forward part of the simulated GPU's clock, optionally with
multiplicative noise), `deadlines.SessionDeadlines` (each request's deadline, as the server sets it) and
the SDK's controllers (`Wisp`, `FixedK`: every drafted token goes through `controller.step`, every verdict
through `controller.observe`, and the link state is updated as `Generation._update_link` does).

What is simulated: time (an event heap), the network (link profile: RTT/2 + jitter + size/bandwidth each
way), the draft model (device profile's time per token; acceptance replayed from the measured trace, as the
emulated devices of `wisp bench` do; a fully accepted draft's last token is fed with the next, as DraftRunner.sync
does), the server's serial host time per step (`gpu_clock.py`: forward plus host work fitted from the H200 `steps`
logs) and, only if given, `device_round_ms` of client work per round (0 by default: not fitted, docs/benchmarks.md).

Server price and hybrid (`--policy wisp`, as the server does it; docs/scheduling.md §9): each simulated verdict
carries the verify price (`sched.pricing`) and the `Wisp` controller pays it; the server verifies only the
prefix of a draft that pays (`verify_len`); `HybridRule` moves a session to server-side decoding (decode
requests, Tokens downlinks) and back, and a session that comes back feeds the tokens decoded meanwhile to its
draft before its next proposal. `SimConfig.hybrid=False` / `truncate=False` turn them off, as `--no-hybrid` /
`--no-truncate`.

Launch alignment (`--policy wisp`, docs/scheduling.md §11): a batch's verdicts carry the time until the batch
launched right after it ends (`WaitHints.launch_in`, as the engine stamps it after its next launch), and the
`Wisp` controller drafts up to that launch, with `SimConfig.align` (`--align`; off by default, as in `wisp serve`).

Scale, two ways (`SimConfig.balance`):
- `device-hash` (default): devices are sharded over GPUs (device d → GPU d mod G, as a balancer hashing a
  per-device key would) and each GPU's shard is an independent simulation, run in `--procs` processes.
- `leastconn` / `roundrobin`: the load balancer of docs/deploy.md. G replicas (each its own queue, policy,
  estimator and verify price) in ONE simulation; each session is assigned when it opens (HAProxy's `balance
  leastconn`: the replica with the fewest live sessions, ties in turn; or plain round-robin) and stays there
  (the affinity cookie). One process, so slower.
Arrivals are closed-loop per device: a session, then Exp(gap) think time, as in `wisp bench`.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass
from typing import Any

from wisp_cloud.deadlines import SessionDeadlines
from wisp_cloud.estimator import ItemShape, VerifyTimeEstimator
from wisp_cloud.fleet.gpu_clock import GpuClock
from wisp_cloud.fleet.profiles import DeviceProfile, LinkProfile
from wisp_cloud.fleet.sim_state import Replica, Sess
from wisp_cloud.fleet.trace_sequence import TraceSequence
from wisp_cloud.sched import Request, Scheduler, make_policy
from wisp_cloud.sched.hybrid import HybridRule, SwitchInputs, round_and_decode_ms
from wisp_cloud.sched.pricing import VerifyPrice, verify_len
from wisp_cloud.sched.regime import MIN_REFITS, SAMPLE_ROUNDS, Regime, SessionSample

_OPEN_BYTES, _ROUND_BYTES, _VERDICT_BYTES, _TOKENS_BYTES = 400, 120, 160, 90


@dataclass
class SimConfig:
    policy: str  # wisp | sled | centralized | fifo
    controller: str  # "wisp", "fixed:K", or "" (centralized)
    devices: int  # devices on this GPU
    duration_s: float
    warmup_s: float
    gap_s: float
    slo_ttft_ms: float
    slo_tpot_ms: float
    prompt_tokens: list[int]
    lengths: list[int]
    trace: list[dict]  # trace sequences (accepted, top1, entropy)
    device: DeviceProfile
    link: LinkProfile
    estimator: dict  # VerifyTimeEstimator.to_dict()
    max_batch: int = 64
    max_draft: int = 32
    max_siblings: int = 8  # `wisp serve --max-siblings`: siblings a round may carry (token trees)
    noise: float = 0.0  # relative std-dev of simulated batch times around the estimator
    seed: int = 0
    policy_kw: dict | None = None
    drain_s: float = 10.0
    # Tenants (fair sharing, sched/fairness.py): device d belongs to tenant "t{i}" where i is the share its index
    # falls in (shares of the devices, in order; empty: one tenant). Weights by tenant name; others weigh 1.
    tenant_shares: tuple[float, ...] = ()
    tenant_weights: dict[str, float] | None = None
    hybrid: bool = True  # `wisp` policy: the load-adaptive hybrid, as `wisp serve`
    regime: bool = True  # `wisp` policy: the regime decides the hybrid's mode (`--no-regime`: off)
    truncate: bool = True  # `wisp` policy: verify only the prefix of a draft that pays (`--no-truncate`: off)
    learn: bool = False  # the estimators refit online on the simulated steps, as the server's do (`--learn`)
    draft_cap: bool = False  # `wisp` policy with the regime: under load, verdicts cap drafts (`--draft-cap`)
    decode_all: bool = False  # `wisp` policy with the regime: it decodes from the start (`--decode-all`)
    replicas: int = 1  # GPUs simulated together in this one event loop
    balance: str = "device-hash"  # device-hash | leastconn | roundrobin: which replica a new session opens on
    host: dict | None = None  # gpu_clock.HostTime as a dict: serial host time per step (None: a perfect loop)
    padded_clock: bool = False  # the clock keeps a paged estimator's padded features (gpu_clock.varlen_view)
    # per round, between a verdict's arrival and the next round's send, besides drafting
    device_round_ms: float = 0.0
    judge_tpot_ms: tuple[float, ...] = ()  # also judge the records at these TPOT SLOs (summary["judged"])
    # `wisp` policy: verdicts carry the next launch (`launch_in_ms`), as `wisp serve --align`
    align: bool = False
    # devices offer to start decoded by the server while their draft prefills the prompt (`Open.start_on_server`,
    # as the SDK does); a server with the regime accepts (sched/regime.py)
    start_on_server: bool = True

    def tenant_of(self, device: int) -> str:
        edge = 0.0
        for i, share in enumerate(self.tenant_shares):
            edge += share * self.devices
            if device < edge:
                return f"t{i}"
        return f"t{max(0, len(self.tenant_shares) - 1)}"


BALANCE = ("device-hash", "leastconn", "roundrobin")


def _ema(old: float, new: float, w: float = 0.3) -> float:
    return (1 - w) * old + w * new


def simulate_gpu(cfg: SimConfig) -> list[dict]:
    """One GPU and its devices; returns one record per session (same fields as `wisp bench`)."""
    from wisp_sdk.controllers import Action, LinkState, make_controller
    from wisp_sdk.draft_runner import DraftToken
    from wisp_sdk.protocol import Mode
    from wisp_sdk.session import offers_start_on_server, server_decodes_next

    if cfg.balance not in BALANCE:
        raise ValueError(f"balance must be one of {', '.join(BALANCE)}, not {cfg.balance!r}")
    rng = random.Random(cfg.seed)
    clock = GpuClock(cfg.estimator, cfg.host, varlen=not cfg.padded_clock)
    reps = []
    for _ in range(cfg.replicas):
        est = VerifyTimeEstimator.from_dict(cfg.estimator)
        on = cfg.regime and cfg.hybrid and cfg.policy == "wisp" and bool(cfg.controller)
        kw = {**(cfg.policy_kw or {}), **({"protect_decodes": False} if on else {})}
        policy = make_policy(cfg.policy, est, max_batch=cfg.max_batch, **kw)
        sched = Scheduler(policy, est, learn=cfg.learn, tenant_weights=cfg.tenant_weights)
        # the server's regime waits for MIN_REFITS online refits; an estimator that does not learn has its refit
        # count advanced at the server's pace instead (one every `refit_every` steps, in try_run)
        hold: Mode | None = "centralized" if cfg.decode_all else None
        regime = Regime(est, min_refits=MIN_REFITS, cap=cfg.draft_cap, hold=hold) if on else None
        if regime is not None:
            policy.follow(regime)
        reps.append(Replica(sched, VerifyPrice(est), regime))
    turn = itertools.count()  # round-robin position (leastconn breaks ties in turn, as HAProxy does)
    hybrid = HybridRule() if cfg.hybrid and cfg.policy == "wisp" and cfg.controller else None
    truncate = cfg.truncate and cfg.policy == "wisp" and bool(cfg.controller)
    align = cfg.align and cfg.policy == "wisp"
    traces = [TraceSequence(s) for s in cfg.trace or [{"accepted": [1], "top1": [0.9], "entropy": [0.3]}]]
    dev_prof, link = cfg.device, cfg.link
    centralized = cfg.policy == "centralized" or not cfg.controller
    seq = itertools.count()
    heap: list[tuple[float, int, str, Any]] = []
    records: list[dict] = []
    active: dict[str, Sess] = {}
    sids = itertools.count()  # session ids, as the server's (the scheduler keys its requests by them)
    end = cfg.duration_s + cfg.drain_s

    def push(t: float, kind: str, obj: Any) -> None:
        heapq.heappush(heap, (t, next(seq), kind, obj))

    def up(nbytes: int) -> float:
        return link.one_way_s(rng, nbytes, True)

    def down(nbytes: int) -> float:
        return link.one_way_s(rng, nbytes, False)

    # ---- devices ----
    for d in range(cfg.devices):
        push(rng.uniform(0, cfg.gap_s), "start", d)
    server_decodes = [False] * cfg.devices  # per device, as the SDK's client keeps it (server_decodes_next)

    def assign(d: int) -> int:
        n = len(reps)
        if n == 1 or cfg.balance == "device-hash":
            return d % n
        t = next(turn)
        if cfg.balance == "roundrobin":
            return t % n
        return min(range(n), key=lambda i: (reps[i].live, (i - t) % n))

    def start_session(d: int, now: float) -> int | None:
        if now > cfg.duration_s:
            return None
        s = Sess()
        s.sid = f"s{next(sids)}"
        s.dev = d
        s.rep = assign(d)
        reps[s.rep].live += 1
        s.idx = rng.randrange(len(cfg.prompt_tokens))
        s.plen = cfg.prompt_tokens[s.idx]
        s.max_new = cfg.lengths[s.idx]
        s.trace = traces[s.idx % len(traces)]
        s.start = now
        s.gen = 0
        s.first_dev = None
        s.last_dev = None
        s.ctl = None if centralized else make_controller(cfg.controller)
        s.link = LinkState(max_draft=cfg.max_draft)
        s.sent = 0
        s.kept, s.sibs = [], 0
        s.n_drafted = s.n_accepted = 0
        s.central, s.mode_steps, s.catchup, s.k_mean = False, 0, 0, None
        s.unfed, s.tail_unfed, s.moves, s.handed = 0, False, 0, False
        regime = reps[s.rep].regime
        s.probe = regime is not None and regime.enlist()
        s.think = s.answered = None
        active[s.sid] = s
        # start_on_server: the device prefills its draft while the server prefills and then decodes; it offers
        # where its prefill is a sizable share of the TPOT budget (the SDK's rule, with the rate it measured)
        on = (
            cfg.start_on_server
            and reps[s.rep].regime is not None
            and (
                server_decodes[d]
                or offers_start_on_server(s.plen, s.max_new, cfg.slo_tpot_ms, dev_prof.prefill_ms_per_token)
            )
        )
        s.ready_at = now + dev_prof.step_s(rng, s.plen + 1) if on else None
        t_srv = now + up(_OPEN_BYTES + 4 * s.plen)
        s.dl = SessionDeadlines(
            cfg.slo_ttft_ms / 1000,
            cfg.slo_tpot_ms / 1000,
            t_srv,
            max_new_tokens=s.max_new,
            uplink_s=t_srv - now,
        )
        req = Request(
            s.sid,
            "prefill",
            s.plen,
            0,
            deadline=s.dl.prefill_deadline(),
            arrival=t_srv,
            payload=s,
            tenant=cfg.tenant_of(s.dev),
        )
        push(t_srv, "submit", req)
        return s.rep

    def record(s: Sess, finished: bool) -> None:
        ttft = (s.first_dev - s.start) * 1000 if s.first_dev is not None else None
        tpot = (s.last_dev - s.first_dev) * 1000 / (s.gen - 1) if s.gen >= 2 else 0.0
        met = finished and ttft is not None and ttft <= cfg.slo_ttft_ms and tpot <= cfg.slo_tpot_ms
        records.append(
            {
                "device": s.dev,
                "replica": s.rep,
                "tenant": cfg.tenant_of(s.dev),
                "start_s": s.start,
                "ttft_ms": ttft,
                "tpot_ms": tpot,
                "new_tokens": s.gen,
                "met": bool(met),
                "refused": False,
                "error": None if finished else "unfinished",
                "rounds": s.sent,
                "drafted": s.n_drafted,
                "accepted": s.n_accepted,
                "wasted_ms": 0.0,
                "moves": s.moves,
            }
        )

    def finish_session(s: Sess, now: float) -> None:
        active.pop(s.sid, None)
        reps[s.rep].live -= 1
        if reps[s.rep].regime is not None:
            reps[s.rep].regime.finished(s.plen, s.gen)
        server_decodes[s.dev] = server_decodes_next(
            server_decodes[s.dev], s.moves > 0, s.handed, not s.central
        )
        record(s, True)
        push(now + rng.expovariate(1.0 / cfg.gap_s), "start", s.dev)

    def draft_round(s: Sess, now: float) -> None:
        """`Generation._draft_round` with the real controller; submits the round after drafting + uplink."""
        ctl = s.ctl
        ctl.start_round(s.link)
        remaining = s.max_new - s.gen
        limit = max(0, min(remaining - 1, s.link.max_draft, ctl.max_draft))
        kept: list[Any] = []
        t = cfg.device_round_ms / 1000
        correct = True
        first = s.sent == 0 and s.ready_at is None
        while len(kept) < limit:
            # a round's first feed: the verdict's token, the decoded catch-up, and the last draft token when the
            # whole draft was accepted (never fed: drafting stopped after proposing it), as DraftRunner.sync does
            n_feed = (s.plen + 1) if (first and not kept) else 1 + (0 if kept else s.catchup + s.unfed)
            ms = dev_prof.step_s(rng, n_feed) * 1000
            t += ms / 1000
            ok, top1, ent = s.trace.at(s.gen + len(kept))
            correct = correct and ok
            tok = DraftToken(token=1 if correct else 0, prob=top1, entropy=ent, top1=top1, ms=ms)
            action = ctl.step([*kept, tok])
            if action is Action.DROP:
                break
            kept.append(tok)
            if action is Action.SEND:
                break
        s.catchup = s.unfed = 0
        n_drafted = len(kept)
        s.tail_unfed = bool(kept) and (len(kept) == limit or action is Action.SEND)
        regime = reps[s.rep].regime
        cap = regime.cap_for(s.probe) if regime is not None else 0
        if 0 < cap < len(kept):  # a round drafted before the cap was set
            kept = kept[:cap]
            s.tail_unfed = False
        if truncate:  # the server verifies only the prefix that pays; the client judges only that
            kept = kept[
                : verify_len(
                    len(kept),
                    s.dl.acceptance.measured_alpha,
                    reps[s.rep].price.price_ms,
                    cfg.slo_tpot_ms,
                )
            ]
            s.tail_unfed = s.tail_unfed and len(kept) == n_drafted
        s.k_mean = float(len(kept)) if s.k_mean is None else 0.8 * s.k_mean + 0.2 * len(kept)
        s.kept = kept
        s.sibs = min(ctl.siblings(kept), cfg.max_siblings)  # as the SDK: its controller, the server's limit
        s.sent += 1
        t_dev_send = now + t
        t_srv = t_dev_send + up(_ROUND_BYTES + 4 * (len(kept) + s.sibs))
        s.round_sent = t_dev_send
        k = len(kept)
        req = Request(
            s.sid,
            "verify",
            k + 1 + s.sibs,
            s.plen + s.gen - 1,
            deadline=s.dl.round_deadline(k, t_srv),
            arrival=t_srv,
            expected_tokens=s.dl.expected_tokens(k),
            payload=s,
            tenant=cfg.tenant_of(s.dev),
        )
        push(t_srv, "submit", req)
        if k > 1:  # as the client: the mean of the per-token times after the first
            s.link.draft_ms = _ema(s.link.draft_ms, sum(x.ms for x in kept[1:]) / (k - 1))

    def on_answer(s: Sess, req: Request, finish: float, batch_s: float) -> None:
        """A request's last piece ran at `finish`: commit, answer the device, queue what follows."""
        if req.kind == "prefill":
            s.gen = 1
            s.dl.on_first_token(finish)
            arrive = finish + down(_VERDICT_BYTES)
            s.first_dev = s.last_dev = arrive
            if s.gen >= s.max_new:
                push(arrive, "done", s)
            elif centralized:
                submit_decode(s, finish)
            elif s.ready_at is not None:  # start_on_server: decoded until handed to the edge
                s.central, s.mode_steps = True, 0
                submit_decode(s, finish)
            else:
                push(arrive, "draft", s)
            return
        if req.kind == "decode":
            s.gen += 1
            s.dl.on_round(0, 0, finish)
            s.last_dev = finish + down(_TOKENS_BYTES)
            if s.gen >= s.max_new:
                push(s.last_dev, "done", s)
            elif s.central and _switch(s, True, finish):
                s.link.launch_in_ms = 0.0  # the last verdict's launch is long past
                # Switch: drafting resumes after catching up on s.catchup tokens (and the draft's own prefill)
                push(max(s.last_dev, s.ready_at or 0.0), "draft", s)
            else:
                submit_decode(s, finish)
            return
        kept = s.kept
        accepted = 0
        for tok in kept:
            if tok.token != 1:
                break
            accepted += 1
        hit = s.sibling_hit(accepted)  # the sibling and the target's token after it (acceptance.py)
        if s.sibling_judged(accepted):
            s.ctl.observe_sibling(hit)
        room = s.max_new - s.gen
        commit = min(accepted + 1 + hit, room)
        s.gen += commit
        s.unfed = int(hit or (s.tail_unfed and accepted == len(kept)))  # a committed sibling: fed next round
        s.n_drafted += len(kept)
        s.n_accepted += accepted
        s.dl.on_round(len(kept), accepted + hit, finish)
        arrive = finish + down(_VERDICT_BYTES)
        s.last_dev = arrive
        s.ctl.observe(kept, accepted)
        queue_ms = ((req.first_scheduled or req.arrival) - req.arrival) * 1000
        verify_ms = batch_s * 1000
        wait_ms = (arrive - s.round_sent) * 1000
        s.link.rtt_ms = _ema(s.link.rtt_ms, max(0.0, wait_ms - queue_ms - verify_ms))
        s.link.verify_ms = _ema(s.link.verify_ms, verify_ms)
        s.link.wait_hint_ms = 1000 * reps[s.rep].sched.wait_hint(
            ItemShape(len(kept) + 1, s.plen + s.gen), finish
        )
        s.link.price_ms = reps[s.rep].price.price_ms
        regime = reps[s.rep].regime
        cap = regime.cap_for(s.probe) if regime is not None else 0
        s.link.max_draft = min(cfg.max_draft, cap) if cap else cfg.max_draft  # the verdict's draft_cap
        if s.answered is not None:  # the server measures device time from its answer to the next round
            obs = req.arrival - s.answered
            s.think = obs if s.think is None else 0.8 * s.think + 0.2 * obs
        acc = s.dl.acceptance
        if (
            regime is not None
            and s.think is not None
            and s.k_mean is not None
            and acc.n_rounds >= SAMPLE_ROUNDS
        ):
            sample = SessionSample(acc.alpha, cfg.slo_tpot_ms, s.plen + s.gen, acc.accepted, acc.tried)
            regime.observe(s.sid, sample, s.k_mean, 1000 * s.think, s.probe)
        s.answered = finish
        if s.gen >= s.max_new:
            push(arrive, "done", s)
        elif _switch(s, False, finish):
            s.answered = None  # its next round comes after the decoded stretch: no device time to learn
            submit_decode(s, finish)  # FLAG_CENTRALIZE: the server decodes it from here
        else:
            push(arrive, "draft", s)
            if s.think is not None:  # announced: the policy may hold a small batch for it (sched/fill.py)
                reps[s.rep].sched.announce(s.sid, finish + s.think)

    def _switch(s: Sess, back: bool, now: float) -> bool:
        """The server's hybrid rule after a verdict (back=False) or a decode step of a moved session; with its
        too-slow test fed as commit.py feeds it (the device's measured time plus the predicted verify step, and
        the predicted decode step)."""
        if hybrid is None:
            return False
        s.mode_steps += 1
        if back:
            s.catchup += 1
        regime = reps[s.rep].regime
        decode_all = regime is not None and regime.decide(now, reps[s.rep].live) == "centralized"
        probing = (
            s.probe and regime is not None and (s.moves == 0 if back else s.mode_steps < regime.probe_rounds)
        )

        def inputs() -> SwitchInputs:
            k = round(s.k_mean) if s.k_mean is not None else 4
            sched = reps[s.rep].sched
            round_ms, decode_ms = round_and_decode_ms(
                s.think, lambda item: sched.wait_hint(item, now), k, s.plen + s.gen
            )
            p, alpha = reps[s.rep].price, s.dl.acceptance.measured_alpha
            return SwitchInputs(k, alpha, p.price_ms, cfg.slo_tpot_ms, round_ms, decode_ms, p.item_ratio)

        # a session being decoded centrally made moves − 1 round trips before this one (the dwell doubles per trip)
        if hybrid.moves(back, s.mode_steps, s.moves - 1, decode_all, probing, inputs) is None:
            return False
        s.central, s.mode_steps, s.moves = not back, 0, s.moves + (not back)
        s.handed = s.handed or back
        return True

    def submit_decode(s: Sess, now: float) -> None:
        req = Request(
            s.sid,
            "decode",
            1,
            s.plen + s.gen - 1,
            deadline=s.dl.round_deadline(0, now),
            arrival=now,
            payload=s,
            tenant=cfg.tenant_of(s.dev),
        )
        reps[s.rep].sched.submit(req)

    # ---- the GPUs ----
    def try_run(r: int, now: float) -> None:
        rp = reps[r]
        if now < rp.busy_until - 1e-12:
            return
        batch = rp.sched.next_batch(now)
        if batch is None:
            w = rp.sched.wakeup(now)
            if w is not None and (rp.wake_at is None or w < rp.wake_at - 1e-12 or rp.wake_at <= now):
                rp.wake_at = max(w, now + 1e-6)
                push(rp.wake_at, "wake", r)
            return
        base, host = clock.step(batch)
        dur = base
        rp.steps += 1
        if not cfg.learn and rp.regime is not None and rp.steps % rp.regime.estimator.refit_every == 0:
            rp.regime.estimator.refits += 1
        if cfg.noise:
            dur *= max(0.2, 1.0 + cfg.noise * rng.gauss(0.0, 1.0))
        if rp.regime is not None:
            host_ms = 1000.0 * host * dur / base if base > 0.0 else 0.0
            rp.regime.stepped(1000.0 * dur, len(batch), host_ms, len(rp.sched))
        rp.busy_until = now + dur
        push(rp.busy_until, "batch", (r, batch, dur))

    while heap:
        now, _, kind, obj = heapq.heappop(heap)
        if now > end:
            break
        r: int | None = None  # the replica this event concerns
        verdicts: list[Sess] = []  # sessions answered with a verdict by this event
        if kind == "start":
            r = start_session(obj, now)
        elif kind == "submit":
            r = obj.payload.rep
            reps[r].sched.submit(obj)
        elif kind == "draft":
            draft_round(obj, now)
            r = obj.rep
        elif kind == "done":
            finish_session(obj, now)
            r = obj.rep
        elif kind == "batch":
            r, batch, dur = obj
            rp = reps[r]
            outs = rp.sched.complete(batch, dur, now)
            rp.price.update(rp.sched.hints.last_shape, len(rp.sched.waiting))
            for out in outs:
                on_answer(out.request.payload, out.request, now, dur)
                if out.request.kind == "verify":
                    verdicts.append(out.request.payload)
        else:  # "wake": nothing but the try below
            r = obj
        if len(reps) == 1:
            try_run(0, now)  # one GPU: after every event, as before replicas existed
        elif r is not None:
            try_run(r, now)
        if align and r is not None:  # the verdicts go out after the next launch, with its hint (engine.py)
            launch_ms = 1000.0 * reps[r].sched.hints.launch_in(now)
            for vs in verdicts:
                vs.link.launch_in_ms = launch_ms
    for s in active.values():  # still running at the end of the drain: a miss, as in `wisp bench`
        record(s, False)
    return records
