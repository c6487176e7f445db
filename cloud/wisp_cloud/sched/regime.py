"""The regime: does edge speculation or server-side decoding serve more sessions on this GPU? (docs/scheduling.md §12)

A verify step costs about w + T·f (weight read w, compute f per token; the estimator knows both). Capacity is the
number of sessions of which (1 − q) = 90 % meet their TPOT SLO, so the session that decides it is the q-quantile
one: the lowest acceptance, the tightest SLO.

- **Decoding** (the centralized path): every session rides every step with one token, so the step period must
  fit its TPOT. N_dec is the largest N with step(N × 1 token) ≤ m × quantile_q(TPOT).
- **Speculation** with k drafts a round: the device's time is a + b·k (its draft time per token b and the rest a,
  link included: a line fitted over the fleet's rounds, so that a controller drafting longer rounds under load
  does not read as a slower device), then half a step of waiting for the running step and one step S. A round
  commits E(k, α_i) tokens, so session i meets its SLO while S ≤ S_i = (m·E(k, α_i)·TPOT_i − a − b·k) / 1.5.
  The GPU may run steps as long as S = quantile_q(S_i); each session rides one step per round R_i = a + b·k + 1.5·S
  with k + 1 tokens. N_spec is the largest N with step(N · mean(S/R_i) items of k + 1 tokens) ≤ S at the fleet's
  own mean draft length k (what its controllers draft now, not the k that would serve most: at 32B / HumanEval
  the fleet drafted k ≈ 11 where the best k was 4); before any round is measured, the best k in 1..`max_k`.
- **The draft cap.** A device's controller drafts for its own token rate, not for the fleet's capacity: on an H200
  (32B, Jetson-class devices, code10, run 53) the fleet drafted k ≈ 8.6 where the model's best k was 2-3, N_spec
  at the fleet's k was 125-142 against N_dec 163-252, the regime decoded the fleet, and SLED at k = 3 served more
  (≥ 320 devices against 289). So under load (open sessions ≥ `cap_load` × N_spec at the best k) the regime caps
  drafts at that best k: every verdict carries it (`Verdict.draft_cap`; the server also verifies no more), and
  speculation is then priced at the best k. Below that load a longer draft costs no one, and no cap is set. With
  the cap a session's α also enters the model shrunk toward the fleet's (`fleet_samples`). Off by default
  (`cap`, `wisp serve --draft-cap`): on an H200 it raised 32B / Jetson / code10 from ≤ 1.00× to 1.06× centralized
  (run 56), and at 7B / Jetson / code10 (run 57) the model's best k (3) left Jetson rounds no slack, the hybrid moved
  the too-slow sessions to the server and back (580 and 300 moves a point), and WISP fell from 0.97 to 0.31.
  So a cap is tried, then checked: once `STEP_STEPS` steps have run under it (`stepped`), it stays (at the best
  k among those at which the SLO-quantile session meets its TPOT, no margin, at the measured steps) only while the
  capped k itself does; otherwise it is given up until the load falls under the load line. Run 57 (7B): k = 3
  allowed 22-34 ms steps where they ran 50-54 ms; run 56 (32B): k = 3 allowed ≈ 57 ms where they ran 47-53 ms.
  Steps measured without the cap say little about it: in run 59 (32B) an uncapped fleet's rounds (k = 7) ran
  87 ms steps, longer than any k allows, where capped at k = 3 they ran 48 ms; and the estimator misses that
  ratio (it predicts 70 against 83 ms: it overprices these mixed steps' small ones). Measured (runs 60-61): the
  check keeps 7B / Jetson safe (0.90 at 960 devices, against 0.31 unchecked in run 57) but gives the 32B cap up
  within 4-6 s (the model allows k = 3 41 ms steps; capped sessions met the SLO at 47-48 ms); allowing 25 % over the
  model's step kept the 32B cap and lost 7B (0.51). No single allowance fits both rows.
- **Prompts** cost both modes alike: ρ prompt tokens per committed token ride the steps as one more item of
  ρ × (the step's committed tokens). ρ is the fleet's, from its finished sessions (Σ prompt / Σ answer over the
  last `window` of them): a rate of prompts prefilled over tokens committed in the last second read each wave of
  synchronized session starts as a surge (H200 run 45, 7B: the regime flipped twice a point). Where ρ is large
  (HumanEval: a 158-token prompt for a 22-token answer, ρ ≈ 7) every step is compute-bound, and speculation's
  (k + 1)/E verified tokens per committed one cost what they cost in compute, unshared: left out, the model put
  N_dec and N_spec at 249–350 sessions on an H200 at 32B where ≈ 50 were open at 90 % attainment (run 43), and
  never chose decoding; with it, 46–59 and 34–50 (runs 46–48).

Rejected drafts are verified too: speculation pays only where its longer steps share the weight read among more
sessions than its (k + 1)/E tokens per committed token cost in compute, i.e. where TPOT is close to w, drafts are
fast, links short and acceptance high. On an H200 (estimators of runs 12–13, Mac-mini-class drafts at 5.2 ms per
token, a 5 ms link, ShareGPT's 10th-percentile acceptance 0.66) the model gives N_dec 80 against N_spec ≈ 45 at 32B,
TPOT 30; measured, centralized served 64 devices at 0.95 attainment and every speculative arm missed (runs 19–21).

`Regime.decide` picks the mode with the larger capacity, with hysteresis (`hysteresis`, 10 %), once the same
verdict has come `confirm` decisions in a row (near-equal capacities read either way from one decision to the next,
and each flip moves every session) with the capacity it trusts steady between them (`STEADY`), and decoding
only while it would serve every open session (past the N that decoding serves at the quantile TPOT itself, with
no margin, all of them would miss, so an overloaded fleet stays speculative, where the well-accepted sessions still
meet the SLO), and for no more open sessions than the server's recent steps held, give or take (`MEASURED_SLACK`:
beyond them N_dec is extrapolated, and trusted only where those steps were GPU-bound:
`GPU_BOUND_HOST_SHARE`). The gate holds while decoding too: the fleet goes back to speculation once
`confirm` decisions in a row see its decode steps run longer than the quantile TPOT (`GATE_STEPS`), and is decoded
again only for as many sessions as those steps would serve. In the
centralized regime the hybrid moves every speculative session to the server after its first verdict and none comes
back, so WISP serves as centralized serving does instead of losing to it; in the speculative regime the hybrid's
own per-session rule (sched/hybrid.py) applies. Samples are the recent sessions with
`SAMPLE_ROUNDS` measured rounds; in the centralized regime one session in `probe_every` speculates for
`probe_rounds` rounds so that they stay fresh. A probe whose device offered to start decoded does so, and goes to
the edge once it has dwelt (sched/hybrid.py): opened speculative, its first round waited for its draft's prompt
prefill, and on an H200 (32B, Mac mini, HumanEval, TPOT 30, runs 74-75) such probes met their SLO 46 times in 67
while the fleet's decoded sessions met it as centralized serving's did; started decoded, 28 in 29 (runs 76-77).
Until `min_samples` are in, it says speculative (what the sessions opened as). On by default for `--policy wisp`
(`--no-regime` turns it off).
Pure: time is passed in.
"""

from __future__ import annotations

import collections
import dataclasses

from wisp_sdk.protocol import Mode

from wisp_cloud.estimator import VerifyTimeEstimator
from wisp_cloud.sched.capacity import (
    Capacities,
    DeviceLine,
    LineSums,
    SessionSample,
    capacities,
    quantile_of,
)

# The server's regime waits for this many online refits of its estimator before its first decision: the start-up
# profile holds no host time per item. Two refits are 128 steps, a few seconds under load (≈ 6 s at 32B).
MIN_REFITS = 2
# One session in this many opens as a probe (`Regime.enlist`); `wisp serve --no-probes`: none.
PROBE_EVERY = 16
# A session's sample enters the regime after this many measured rounds; the acceptance prior (4 tries at 0.7)
# carries the rest. HumanEval at 32B (H200 runs 46-48): the server decodes a session's first 16 tokens, its
# answer is ≈ 24 and the fleet drafts k ≈ 12, so few sessions ever reached 4 rounds and the first decision came
# 9-22 s into each point.
SAMPLE_ROUNDS = 2
# A session's α enters the model shrunk toward the fleet's rate by this many tries at it (`Regime.fleet_samples`).
SHRINK_TRIES = 8.0
# The measured step the cap's slack is read against is a decayed mean over about this many steps (≈ 3 s at 32B).
STEP_STEPS = 64
# A flip is confirmed only by decisions on successive estimator fits whose trusted capacity moved at most this share
# from one to the next. On an H200 (7B, Mac mini, ShareGPT, TPOT 60) the first decisions after the refits read N_dec
# 527-574, then 401-439, then ≈ 290-335 as the online fit settled (one refit every 64 steps, ≈ 3 s; a decision every
# 2 s), and the five flips to decoding that cost that row 6-47 points of attainment came on the second or third
# decision (runs 64, 67, 68 twice, 72; run 72's on 404 -> 403, two decisions on one fit); at 32B N_dec moved 0-6 %
# from the first decision on (runs 51-52, 70-71). Each decision is read against the one on the fit before it,
# whatever that one said: in H200 run 82 (7B, Jetson, code10, 720 devices) N_dec read 341, 328, then 595, 708, 700
# on three refits; the jump to 595 started a count (the decision before it had said "stay"), 708 -> 700 confirmed
# it, and the decoded fleet met 0.69 where the speculating one had met 0.80 (N_dec read 458, then 291, after it).
STEADY = 0.1
# Decoding is chosen only for as many open sessions as this × the largest step the server ran in its last
# `MEASURED_STEPS` (≈ the estimator's window): beyond that N_dec is the fit's extrapolation. On an H200 (7B, Jetson,
# code10, runs 83-84) speculative steps held 70-120 items, and as the estimator's window of decode steps turned over
# its N_dec rose from ≈ 300 to 620-700 in 10 s; the fleet flipped at 540-640 open sessions, in each of three points,
# and the fits on the decode steps that followed read N_dec 284-437. At 32B (run 78) the flips came with 14-17 open
# and steps of 11-17 items.
MEASURED_SLACK = 1.25
MEASURED_STEPS = 512
# ... unless the server's recent steps spent at most this share of their time on host work (a decayed mean over
# about `STEP_STEPS` steps): the fit's extrapolation goes wrong through the per-item host work that the start-up
# profile does not hold, and where steps are GPU-bound it holds. On an H200 (32B, Jetson, code10, run 89) the gate
# held a fleet speculative with N_dec 201-238 against N_spec 115-138 and 223-302 open (steps of 65-111 items, host
# 3-6 ms of 71-88 ms: a share of 0.04-0.07), and WISP met 0.87 where centralized met 0.98 at 288 devices; at 7B
# (runs 83-85), where the extrapolation was wrong, host work was 4-7 ms of 23-36 ms steps (0.18-0.20).
GPU_BOUND_HOST_SHARE = 0.1
# While decoding, the gate reads the decode steps themselves, once the flip has drained (the first `DRAIN_STEPS`
# steps after it still carry speculative rounds) and `GATE_STEPS` more have run: their mean period against the
# quantile TPOT. On an H200 (32B, Jetson, code10, run 90) the fits on the transition's mixed steps put N_dec at
# 155-194 (a limit of 176-220) with 233-249 open, the gate sent the fleet back after 4 s and WISP met 0.88 where
# centralized, whose 234-item decode steps ran 54 ms (p50) against a 60-ms TPOT, met 1.00.
DRAIN_STEPS = 16
GATE_STEPS = 32
# In the centralized regime a probe drafts at most this many tokens a round (`Regime.cap_for`): at 32B a step is
# compute-bound near the SLO (≈ 0.15 ms a token on an H200), and a probe's k ≈ 7 rounds stretched every decode step
# (run 75, 32B / HumanEval / TPOT 30: WISP held decoded met 0.91 with probes, 0.97 without, centralized 0.96).
# At k = 2 a round's 3 tokens commit ≈ 2 (α ≈ 0.7): about a decoded token's compute per committed token. Its α
# still enters the samples; its capped rounds are no point of the device line (nor of the fleet's own k).
PROBE_CAP = 2


def _decayed(mean: float, x: float, n: int) -> float:
    """The running mean after its `n`-th value `x`: plain over the first `STEP_STEPS`, then decayed over as many."""
    return x if n == 1 else mean + (x - mean) / min(n, STEP_STEPS)


class Regime:
    """The fleet's recent sessions and the mode the hybrid drives them to (module docstring)."""

    def __init__(
        self,
        estimator: VerifyTimeEstimator,
        *,
        cap: bool = False,
        cap_load: float = 0.5,
        quantile: float = 0.1,
        margin: float = 0.9,
        hysteresis: float = 0.1,
        window: int = 256,
        min_samples: int = 16,
        every_s: float = 2.0,
        probe_every: int = PROBE_EVERY,
        probe_rounds: int = 8,
        min_refits: int = 0,
        confirm: int = 2,
        hold: Mode | None = None,
    ) -> None:
        self.estimator = estimator
        # benchmarks (`wisp serve --decode-all`): this mode from the start, never re-decided
        self.hold = hold
        # The server's estimator starts as `wisp profile`'s fit, which holds the GPU's time only: decoding's
        # per-item host work (39 µs an item at 7B in H200 run 40's online fit, against a profile that prices a
        # sequence at 0) enters with the online refits. On the profile, N_dec came out 1952 against ≈ 600 after
        # two refits, and in run 40 every fresh engine flipped to the centralized regime and back (2 flips and
        # 298-366 moves to the server a point). So the first decision waits for `min_refits` refits.
        self.min_refits = min_refits
        self._refits0 = estimator.refits
        self.quantile, self.margin, self.hysteresis = quantile, margin, hysteresis
        self.window, self.min_samples, self.every_s = window, min_samples, every_s
        self.probe_every, self.probe_rounds = probe_every, probe_rounds
        self.mode: Mode = hold or "speculative"
        self.last: Capacities | None = None  # the capacities of the last decision (stats)
        self.flips = 0
        self.decisions = 0  # decisions taken (each re-reads the model)
        self._samples: collections.OrderedDict[str, SessionSample] = collections.OrderedDict()
        self._decided_at = float("-inf")
        self._opened = 0
        self._line = LineSums()
        self._known: DeviceLine | None = None  # the last determined device line (`device`)
        # finished sessions' decayed prompt and answer tokens (their ratio is the fleet's ρ)
        self._prompt = 0.0
        self._answer = 0.0
        self.confirm = confirm
        self._leaning = 0  # consecutive decisions that said flip (`decide`)
        # Since the last flip (which changes what is trusted): the estimator fit of the latest decision, the trusted
        # capacity it read, the one the latest decision on the fit before read (None: none), and the fit of the
        # last decision that counted toward a flip.
        self._fit = -1
        self._fit_at: int | None = None
        self._before_at: int | None = None
        self._lean_fit = -1
        # decisions in a row, while decoding, that saw more sessions open than decoding serves (`decide`)
        self._over = 0
        # the open sessions that decoding last failed to serve (its `decode_limit` then; None: none): the fleet is
        # decoded again only at or under it
        self.decode_ceiling: int | None = None
        self.cap, self.cap_load = cap, cap_load
        self.draft_cap = 0  # the draft cap verdicts carry now (0: none; module docstring)
        self.fleet: Capacities | None = None  # the last decision's capacities at the fleet's own k (stats)
        self.measured_step_ms = 0.0  # since the cap last changed, a decayed mean (ms; 0: none yet)
        # of the recent steps' time, the host's (a decayed mean; None until a step's host time is known)
        self.host_share: float | None = None
        # the items of the server's recent steps (`MEASURED_SLACK`)
        self._batches: collections.deque[int] = collections.deque(maxlen=MEASURED_STEPS)
        self._steps = 0  # steps since the cap last changed
        # while decoding: steps since the flip, and the drained ones' decayed mean period (ms; `DRAIN_STEPS`)
        self._decoding_steps = 0
        self._decoded_ms = 0.0
        self._no_slack = False  # a cap was given up for lack of slack, for as long as the load lasts

    def observe(
        self, session_id: str, sample: SessionSample, k: float, think_ms: float, probe: bool = False
    ) -> None:
        """A session's latest measured speculation (it replaces the session's previous one), and a point of the
        device line: its mean draft length and its device time per round (none from a capped probe: `PROBE_CAP`)."""
        self._samples[session_id] = sample
        self._samples.move_to_end(session_id)
        while len(self._samples) > self.window:
            self._samples.popitem(last=False)
        if not self._probe_capped(probe):
            self._line.add(k, think_ms, decay=1.0 - 1.0 / self.window)

    def _probe_capped(self, probe: bool) -> bool:
        """Are this session's rounds capped at `PROBE_CAP` (a probe in the centralized regime)?"""
        return probe and self.mode == "centralized"

    def cap_for(self, probe: bool) -> int:
        """The most draft tokens a session's next round should carry (0: no cap): the fleet's `draft_cap`, and
        `PROBE_CAP` for a probe in the centralized regime."""
        if self._probe_capped(probe):
            return min(self.draft_cap, PROBE_CAP) if self.draft_cap else PROBE_CAP
        return self.draft_cap

    def stepped(self, ms: float, items: int = 0, host_ms: float | None = None, left: int = 0) -> None:
        """A step of `items` items ran for `ms`, `host_ms` of them host work before the forward (None: unknown),
        `left` requests left waiting by its selection: the cap's slack is read against these, decoding is chosen
        only for as many sessions as recent steps held (`MEASURED_SLACK`) unless they were GPU-bound
        (`GPU_BOUND_HOST_SHARE`), and while decoding the gate reads them (`GATE_STEPS`)."""
        if items > 0:
            self._batches.append(items)
        if host_ms is not None and ms > 0.0:
            share, last = min(1.0, host_ms / ms), self.host_share
            self.host_share = share if last is None else last + (share - last) / STEP_STEPS
        self._steps += 1
        if self.mode == "centralized":
            self._decoding_steps += 1
            # a decode left waiting rides a later step: the period a decoded session sees is the step's times the
            # ready work over the work that rode (H200 run 92, centralized at 336 devices: 256 items, max_batch,
            # and 28 left a step; steps of 60-62 ms p50, TPOT p50 65)
            period = ms * (items + left) / items if items > 0 else ms
            n = self._decoding_steps - DRAIN_STEPS
            if n > 0:
                self._decoded_ms = _decayed(self._decoded_ms, period, n)
        self.measured_step_ms = _decayed(self.measured_step_ms, ms, self._steps)

    def finished(self, prompt: int, answer: int) -> None:
        """A session finished: `prompt` tokens of prompt, `answer` generated."""
        decay = 1.0 - 1.0 / self.window
        self._prompt = self._prompt * decay + prompt
        self._answer = self._answer * decay + answer

    def prompt_per_token(self) -> float:
        """ρ: the fleet's prompt tokens per generated token, over its recent finished sessions."""
        return self._prompt / self._answer if self._answer > 0.0 else 0.0

    def device(self) -> DeviceLine:
        """The device line fitted so far (`LineSums.line`); where draft lengths hardly vary, all of the time
        charged per token. With the cap, once the fleet drafts the cap its lengths stop varying, and the last
        determined line stands: charged all per token, the time of a capped fleet's k would make every shorter k
        look cheaper than it is, and each cap would lower the next."""
        line = self._line.line()
        if line is not None:
            self._known = line
            return line
        return self._known if self.cap and self._known is not None else self._line.per_token()

    def enlist(self) -> bool:
        """A session opened: is it a probe (stays speculative for `probe_rounds` rounds in either regime)?
        `probe_every` 0: none is."""
        self._opened += 1
        return self.probe_every > 0 and self._opened % self.probe_every == 0

    def due(self, now: float) -> bool:
        """Would `decide` re-decide at `now` (its period has passed)? Before that it returns the mode as it is.
        A held mode is never re-decided (else the hybrid's full check would run after every decoded token)."""
        return self.hold is None and now - self._decided_at >= self.every_s

    def decide(self, now: float, active: int | None = None) -> Mode:
        """The current mode, re-decided at most every `every_s` seconds. `active`: the sessions open now. Decoding
        is chosen only while it would serve them all (active ≤ `decode_limit`, N_dec at the quantile TPOT itself):
        past that every decoded session misses its SLO, while speculation still serves the well-accepted ones.
        The gate has no margin: with N_dec's (m = 0.9) it held a 32B / HumanEval fleet at 51 open sessions
        speculative for 22 s against N_dec 50-54 (H200 run 47). On an H200 (7B, Jetson, code10, run 42) an
        overloaded fleet's device line read 114 + 13 ms/token (the rounds' device time holds the fleet's and the
        server's own lag), N_spec fell to 0, and the flip to decoding took WISP from 0.87 (no hybrid) to 0.36-0.38
        attainment at 1120-1280 devices, where centralized served 0.25. The gate holds while decoding as well:
        `confirm` decisions in a row that see the drained decode steps' mean period over the quantile TPOT send the
        fleet back to speculation at once, and it is decoded again only with at most as many open as that period
        would serve, scaled (`decode_ceiling`). And decoding is
        chosen only for as many open sessions as the server's recent steps held, give or take (`MEASURED_SLACK`):
        N_dec beyond them is the fit's extrapolation, trusted only where those steps were GPU-bound
        (`GPU_BOUND_HOST_SHARE`)."""
        if not self.due(now) or len(self._samples) < self.min_samples:
            return self.mode
        refitted = self.estimator.refits - self._refits0 >= self.min_refits
        if not refitted and not self.cap:
            return self.mode
        self._decided_at = now
        self.decisions += 1
        samples = self.fleet_samples()
        cap = self.fleet = self._capacities(samples, self._line.mean_k())
        if self.cap:
            cap = self._draft_cap(samples, active, cap)
        self.last = cap
        if not refitted:
            # The cap is set on the start-up profile's fit: it ranks draft lengths, whose steps differ in tokens,
            # and an uncapped fleet's long rounds cost every step meanwhile (H200 run 55: 77-104 ms steps for the
            # 10-15 s to the first decision, against 57 ms capped). The mode waits for the online refits, which
            # price decoding's per-item host work.
            return self.mode
        h = 1.0 + self.hysteresis
        serves_all = active is None or active <= cap.decode_limit
        to_decode = self.mode == "speculative"
        gated = False  # decoding no longer serves the open sessions: back to speculation
        if to_decode:
            under = active is None or self.decode_ceiling is None or active <= self.decode_ceiling
            seen = (
                active is None
                or not self._batches
                or (self.host_share is not None and self.host_share <= GPU_BOUND_HOST_SHARE)
                or active <= MEASURED_SLACK * max(self._batches)
            )
            flip = cap.decode > h * cap.speculative and serves_all and under and seen
        else:
            flip = cap.speculative > h * cap.decode
            # The gate holds while decoding too: the fit that priced the flip was read on speculative steps, and
            # on an H200 (7B, Jetson, code10, runs 82-83) N_dec rose 305 -> 663 over 12 s of them (the estimator's
            # window of decode steps turned over), the fleet flipped at 567 open sessions, and the next fits, on
            # decode steps, read N_dec 374 and 284 with 632-639 open. It reads the drained decode steps, not a fit
            # (`GATE_STEPS`).
            measured = self._decoding_steps - DRAIN_STEPS >= GATE_STEPS
            tpot = quantile_of([s.tpot_ms for s in samples], self.quantile)
            over = measured and self._decoded_ms > tpot
            self._over = self._over + 1 if over else 0
            gated = self._over >= self.confirm
            if gated:
                # decoded again only for as many as the measured period would serve, if the fit allows that many
                scaled = int(active * tpot / self._decoded_ms) if active else cap.decode_limit
                self.decode_ceiling = min(cap.decode_limit, scaled)
        # A decision that says flip counts where its trusted capacity held still (`STEADY`) since the latest decision
        # on the fit before its own, whatever that one said (the first fit since a flip has none, and counts); one
        # whose capacity moved counts nothing and ends the count; a second on the fit counted last adds nothing.
        trusted, fit = (cap.decode if to_decode else cap.speculative), self.estimator.refits
        if fit != self._fit:
            self._fit, self._before_at = fit, self._fit_at
        self._fit_at = trusted
        if not flip:
            self._leaning = 0
        elif not (self._leaning and fit == self._lean_fit):
            at = self._before_at
            steady = at is None or abs(trusted - at) <= STEADY * at
            self._leaning = self._leaning + 1 if steady else 0
            self._lean_fit = fit
        if self._leaning >= self.confirm or gated:
            self.mode = "centralized" if self.mode == "speculative" else "speculative"
            self.flips += 1
            self._leaning = self._over = 0
            self._fit, self._fit_at, self._before_at, self._lean_fit = -1, None, None, -1
            self._decoding_steps, self._decoded_ms = 0, 0.0
            if self.mode == "centralized":
                self.decode_ceiling = None
        return self.mode

    def _draft_cap(self, samples: list[SessionSample], active: int | None, own: Capacities) -> Capacities:
        """Set `draft_cap` (module docstring) and return the capacities that speculation is priced at: the cap's,
        or the fleet's own (`own`) where there is none."""
        before = self.draft_cap
        best = self._capacities(samples, None)
        loaded = active is not None and active >= self.cap_load * best.speculative
        priced = own
        if not loaded:
            self.draft_cap, self._no_slack = 0, False  # below the load line a long draft costs no one
        elif self._no_slack:
            self.draft_cap = 0
        elif before == 0:
            # Under load the fleet drafts the best k from now on (the verdicts' cap), so that is what speculation
            # serves. A fleet that drafts no more than that needs no cap. Not before a session has finished: with
            # no prompt ratio the best k is priced as if prompts cost nothing (run 61, 32B: a first cap of k = 6
            # on 16 samples, where the fleet's later decisions put it at 2-4).
            if own.k > best.k and self._answer > 0.0:
                self.draft_cap, priced = best.k, best
        elif self._steps < STEP_STEPS:
            priced = self._capacities(samples, before)  # the cap holds until its steps are measured
        elif self._capacities(samples, before, self.measured_step_ms).k == 0:
            self.draft_cap, self._no_slack = 0, True  # no slack at the steps it runs: given up
        else:
            priced = self._capacities(samples, None, self.measured_step_ms)
            self.draft_cap = priced.k
        if self.draft_cap != before:
            self._steps = 0
        return priced

    def fleet_samples(self) -> list[SessionSample]:
        """The samples, each session's α shrunk toward the fleet's own (`SHRINK_TRIES` tries at the fleet's rate):
        a session's α after a few rounds is mostly noise and its server-side prior (4 tries at 0.7), and the
        quantile of noisy estimates sits far under the quantile of the sessions' true rates."""
        samples = list(self._samples.values())
        tried = sum(s.tried for s in samples)
        if tried <= 0.0 or not self.cap:  # the regime's margins were measured on unshrunk α (runs 45-53)
            return samples
        rate = sum(s.accepted for s in samples) / tried
        return [
            dataclasses.replace(s, alpha=(s.accepted + SHRINK_TRIES * rate) / (s.tried + SHRINK_TRIES))
            if s.tried > 0.0
            else s
            for s in samples
        ]

    def _capacities(
        self, samples: list[SessionSample], fleet_k: float | None, slack_ms: float = 0.0
    ) -> Capacities:
        return capacities(
            self.estimator,
            samples,
            self.device(),
            self.quantile,
            self.margin,
            prompt_per_token=self.prompt_per_token(),
            fleet_k=fleet_k,
            slack_ms=slack_ms,
        )

    @property
    def sample_count(self) -> int:
        """How many recent sessions' samples the model reads."""
        return len(self._samples)

    @property
    def no_slack(self) -> bool:
        """Was the cap given up for lack of slack (until the load falls)?"""
        return self._no_slack

    @property
    def leaning(self) -> int:
        """Consecutive decisions so far that said flip (`confirm` of them flip)."""
        return self._leaning

    def stats(self) -> dict[str, float | int | str]:
        last, device = self.last, self.device()
        return {
            "mode": self.mode,
            "flips": self.flips,
            "samples": self.sample_count,
            "decode_capacity": last.decode if last else -1,
            "speculative_capacity": last.speculative if last else -1,
            "speculative_k": last.k if last else -1,
            "draft_cap": self.draft_cap,
            "speculative_step_ms": round(last.step_ms, 2) if last else -1,
            "measured_step_ms": round(self.measured_step_ms, 2),
            "cap_no_slack": int(self._no_slack),
            "decode_ceiling": self.decode_ceiling if self.decode_ceiling is not None else -1,
            "device_fixed_ms": round(device.fixed_ms, 2),
            "device_per_token_ms": round(device.per_token_ms, 2),
            "prompt_per_token": round(self.prompt_per_token(), 3),
        }
