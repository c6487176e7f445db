"""The simulator's state (fleet/simulate.py): a GPU's server and a session (their traces: fleet/trace_sequence.py)."""

from __future__ import annotations

from wisp_cloud.sched import Scheduler
from wisp_cloud.sched.pricing import VerifyPrice
from wisp_cloud.sched.regime import Regime


class Replica:
    """One GPU's server: its own scheduler (queue, policy, estimator), verify price and busy clock."""

    __slots__ = ("busy_until", "live", "price", "regime", "sched", "steps", "wake_at")

    def __init__(self, sched: Scheduler, price: VerifyPrice, regime: Regime | None) -> None:
        self.sched = sched
        self.price = price
        self.regime = regime  # the server's regime (sched/regime.py), None where it has none
        self.busy_until = 0.0
        self.wake_at: float | None = None
        self.live = 0  # open sessions (what leastconn counts)
        self.steps = 0  # steps run (the regime's refit pace)


class Sess:
    """One simulated session: its device, draft controller and link, and the server's view of it."""

    __slots__ = (
        "sid",  # its session id (the scheduler's requests and the regime's samples are keyed by it)
        "ctl",
        "dev",
        "dl",
        "first_dev",
        "gen",
        "idx",
        "last_dev",
        "link",
        "max_new",
        "plen",
        "round_sent",
        "sent",
        "start",
        "trace",
        "kept",
        "sibs",  # siblings sent with this round's first draft tokens (token trees)
        "moves",  # times the hybrid moved it to server-side decoding
        "handed",  # the hybrid handed it back to the edge at least once (session.server_decodes_next)
        "n_drafted",
        "n_accepted",
        "central",  # the hybrid moved it to server-side decoding
        "ready_at",  # start_on_server: when the device's draft has prefilled the prompt (None: not started so)
        "probe",  # it keeps speculating for a while in the centralized regime (sched/regime.py)
        "mode_steps",  # rounds / decoded tokens since the last switch
        "catchup",  # tokens decoded by the server that the draft has not been fed yet
        "unfed",  # 1 when the last round's draft was all accepted: its last token still to feed
        "tail_unfed",  # this round's last draft token was proposed but not fed (no DROP after it)
        "k_mean",
        "rep",  # the replica it opened on (sticky)
        "think",  # the server's EWMA of its device time (verdict sent → next round arrived), as the engine's
        "answered",  # when the server sent its last verdict (None before the first round)
    )

    def sibling_judged(self, accepted: int) -> bool:
        """The round's draft token at `accepted` was rejected and had a sibling (the verdict judged it)."""
        return accepted < min(self.sibs, len(self.kept))

    def sibling_hit(self, accepted: int) -> bool:
        """That sibling was the target's token: the real draft's second choice there matched (the trace)."""
        return self.sibling_judged(accepted) and self.trace.second_at(self.gen + accepted)
