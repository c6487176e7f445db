"""Verification batch scheduling, one package that the engine and `wisp simulate` both drive.

Pure and clock-injected (no asyncio, no torch):
  requests   `Request` (one unit of a session's model work), `Slot`, `Batch`
  policies   one `Policy` base class with no-op hooks; `fifo`, `sled`, `centralized`, `wisp` (docs/scheduling.md)
  queue      `Scheduler`: the waiting queue around a policy (submit, next batch, complete)
  hints      `WaitHints`: the verdict's predicted wait for a session's next round
  fill       `fill_hold`: how long a small batch waits for announced rounds (filling the weight read)
  fairness   `FairShare`: weighted fair sharing across tenants (auth tokens), start-time fair queueing
  admission  `AdmissionController`: refuse a session that would push attainment below target
The verify-time estimator (`wisp_cloud.estimator`) and the per-session deadlines (`wisp_cloud.deadlines`) are the
scheduler's inputs and live beside it.
"""

from wisp_cloud.sched.admission import AdmissionController, AdmissionDecision, SessionLoad
from wisp_cloud.sched.fairness import ANON, FairShare
from wisp_cloud.sched.hints import WaitHints
from wisp_cloud.sched.policies import (
    POLICIES,
    CentralizedPolicy,
    FifoPolicy,
    Policy,
    SledPolicy,
    WispPolicy,
    make_policy,
)
from wisp_cloud.sched.queue import Outcome, Scheduler, SchedulerStats
from wisp_cloud.sched.requests import Batch, Kind, Request, Slot

__all__ = [
    "ANON",
    "POLICIES",
    "AdmissionController",
    "AdmissionDecision",
    "Batch",
    "CentralizedPolicy",
    "FairShare",
    "FifoPolicy",
    "Kind",
    "Outcome",
    "Policy",
    "Request",
    "Scheduler",
    "SchedulerStats",
    "SessionLoad",
    "Slot",
    "SledPolicy",
    "WaitHints",
    "WispPolicy",
    "make_policy",
]
