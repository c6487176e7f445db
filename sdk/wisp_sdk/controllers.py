"""Speculation controllers: how many tokens to draft each round, one interface for all.

The client drives a round like this:

    ctl.start_round(link)
    loop: token = runner.propose(); action = ctl.step(tokens_so_far + [token])
          CONTINUE -> keep the token, feed it to the draft, propose the next one
          SEND     -> keep the token and send the round
          DROP     -> do not send this token; send the round without it
    ... verdict ... ctl.observe(sent_tokens, accepted)

Cost model behind `Wisp` (why it looks the way it does). Feeding a kept token to the draft costs `c` ms; that
forward is wasted only if the token is rejected, since an accepted token's KV is reused next round. A round
costs T = drafting + RTT + the server's hinted wait + verify, and commits in expectation
E = 1 + sum_i S_i tokens, where S_i is the probability that the first i drafts all survive. Drafting one more
token is worth it iff it raises the rate E/T:  (E + S*a_next) / (T + c) > E / T  <=>  S * a_next * T > c * E.
A long hinted wait or a slow link (large T) therefore buys more drafting; a fast link buys less. A token whose
own predicted acceptance is low is not fed further (stop just before the predicted rejection), and is not even
sent when it is below `min_send`.

Server price. Each verdict carries `price_ms`: the GPU time one more verified token costs the server's other
sessions right now (0 when the GPU is idle, rising with load; docs/scheduling.md, "Verify price"). A sent token
is verified whether or not it survives, so it costs c + price, and the rule becomes S * a_next * T > (c + price)
* E: under compute-bound load drafts shrink, and price 0 is the rule above.

GPU cap (`Wisp(round_overhead=H)`, `wisp+cap`; off by default: on an H200, run 37, it drafted k 2.3-2.5 and served
594 / 578 devices against plain WISP's 654 / 580, 7B / Mac mini / ShareGPT; run 39, 32B HumanEval, 0.88 against
0.85 at 88 devices and less above). The rule above treats
the hinted wait as given, but on a compute-bound GPU the wait is the load itself: longer drafts make longer steps
and a longer queue, which the rule answers with longer drafts (H200 runs 34-35, docs/benchmarks.md: k 4.4 -> 4.9
and 6.2 -> 8.2 as the fleet grew, 9.5 at 32B). On such a GPU a round costs about H + (k + 1) verified tokens' worth
(H: its fixed cost, host work and per-item overhead) and commits E(k), so while the price is positive the round is
sent at the k that minimizes (k + 1 + H) / E(k) at the running acceptance rate (`gpu_draft_len`). A first try, an
SLO stop (send a round already within 0.7 x its TPOT SLO), did not shorten drafts at the capacity edge (H200 run
36) and was removed.

Token trees (`Wisp(tree=N)`, `wisp+tree`). A round may carry a sibling for each of its first draft tokens (the
draft's second choice, or a second draw when sampling: free on the device, the same logits), verified in the same
pass; it commits when its draft token is rejected and it is the target's token. Sibling j saves this session's time
per committed token, T / E, with probability S_(j-1) (1 - a_j) h (the tokens before j survive, token j does not,
the sibling hits: h learned from verdicts, `observe_sibling`), and costs one verified token: the price, and at least
2 % of a committed token (frame bytes, a verify slot). Siblings go with a round's first m tokens, so m is the prefix
whose summed value minus cost is largest: on an idle GPU as deep as the rejections are likely, under
compute-bound load none (docs/scheduling.md §14).

Launch alignment (docs/scheduling.md §11). The server's steps run back to back; each verdict carries
`launch_in_ms` = F, the predicted time from the verdict leaving the server to the launch of the step after the
one now running: the earliest step our next round can join. With a round of k tokens arriving at RTT + k*c
(after the verdict left), it joins the launch at F if RTT + k*c <= F, else the next one, F + j*S (S: the
predicted step time, taken as F itself: the step now running predicts the next), and the round takes
T(k) = launch(k) + S. Tokens drafted while the round would still arrive before the launch are free; one token
more that misses the launch costs a whole step. So the rule looks ahead: continue while some reachable k' > k
has a better rate E(k') / (T(k') + (k' - k) * price) than E(k) / T(k) (E(k') extends the survival with the
running acceptance rate), which drafts the tokens before a launch, and across a boundary only as many as
pay for the extra step together. Without a hint (F = 0: an idle GPU, a server without `--align`) T(k) is
the round time above and the look-ahead is one token (more would never pass where one fails: the gain per
token only falls with k), so the decisions are exactly the price rule's.
"""

from __future__ import annotations

import copy
import enum
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from wisp_sdk.draft_runner import DraftToken
from wisp_sdk.predictor import RejectionPredictor, features

# `wisp+cap`: a round's fixed GPU cost in verified tokens' worth. H200, 7B, compute-bound steps (runs 32-35): ≈ 40 µs
# of host work and per-item overhead a round against ≈ 27 µs a verified token
ROUND_OVERHEAD = 1.5
# `wisp+tree`: the most siblings a round carries (the server may allow fewer: `Limits.max_siblings`, default 8)
TREE_SIBLINGS = 8
# a sibling committed in fewer rounds than this is not worth its frame bytes and the verify slot, even when idle
MIN_SIBLING_P = 0.02


class Action(enum.Enum):
    CONTINUE = "continue"
    SEND = "send"
    DROP = "drop"


@dataclass
class LinkState:
    """What the client knows about the link and the server, in ms (EMAs of measurements, plus the last hint)."""

    rtt_ms: float = 20.0  # network round trip: observed wait minus the server's queue and verify time
    wait_hint_ms: float = 0.0  # the server's predicted queueing wait for our next round
    verify_ms: float = 5.0  # server verify time per round
    draft_ms: float = 5.0  # draft forward time per token on this device
    max_draft: int = 16  # the most drafts the next round may carry: the server's limit, or its cap if lower
    limit: int = 16  # the server's per-round limit (its Welcome's), which a verdict's cap never lowers
    price_ms: float = 0.0  # the server's price of one verified token (the last verdict's), in ms
    launch_in_ms: float = 0.0  # the last verdict's: from its sending to the server's next joinable launch


class Controller(ABC):
    name: str = "controller"
    max_draft: int = 16
    tree: int = 0  # the most siblings a round may carry (token trees); 0 drafts chains only

    def start_round(self, link: LinkState) -> None:
        self.link = link

    @abstractmethod
    def step(self, tokens: list[DraftToken]) -> Action:
        """Decide about the last of `tokens` (just proposed; the others are kept)."""

    def observe(self, sent: list[DraftToken], accepted: int) -> None:  # noqa: B027 - optional hook
        """Learn from a verdict: `accepted` of `sent` survived (`sent`: the tokens the server verified)."""

    def ahead_budget(self) -> int:
        """How many tokens to draft ahead while the verdict is in flight (0: wait idle)."""
        return 0

    def siblings(self, tokens: list[DraftToken]) -> int:
        """How many of the round's first `tokens` to send a sibling for (each has one: `DraftToken.alt`)."""
        return 0

    def observe_sibling(self, hit: bool) -> None:  # noqa: B027 - optional hook
        """Learn from a verdict that judged a sibling (its draft token was rejected): `hit`, it was committed."""


class FixedK(Controller):
    """The SLED baseline: always draft k tokens, then wait idle for the verdict."""

    def __init__(self, k: int = 4) -> None:
        if k < 0:
            raise ValueError("k must be >= 0")
        self.k = k
        self.name = f"fixed:{k}"
        self.max_draft = k

    def step(self, tokens: list[DraftToken]) -> Action:
        if self.k == 0:
            return Action.DROP
        return Action.SEND if len(tokens) >= min(self.k, self.link.max_draft) else Action.CONTINUE


class Wisp(Controller):
    """Predictor-driven drafting: stop before a predicted rejection, draft as long as it pays for itself."""

    def __init__(
        self,
        predictor: RejectionPredictor | None = None,
        max_draft: int = 16,
        min_send: float = 0.25,
        draft_ahead: int = 0,
        rate0: float = 0.6,
        rate_ema: float = 0.9,
        online_lr: float = 0.05,
        round_overhead: float = 0.0,
        tree: int = 0,
        sibling_hit0: float = 0.4,
    ) -> None:
        # A private copy: it keeps learning from this session's verdicts (online_lr), and those are not the
        # next session's business.
        self.predictor = copy.deepcopy(predictor) if predictor is not None else RejectionPredictor()
        self.online_lr = online_lr
        self.max_draft = max_draft
        self.min_send = min_send
        self.draft_ahead = draft_ahead
        self.rate = rate0
        self.rate_ema = rate_ema
        self.round_overhead = round_overhead  # > 0: the GPU cap (module docstring), in verified-token units
        self.name = "wisp+cap" if round_overhead > 0 else "wisp+tree" if tree > 0 else "wisp"
        self.tree = tree
        self.sibling_hit = sibling_hit0  # P(sibling committed | its draft token rejected), an EMA
        self.link = LinkState()
        self._survive: list[float] = []  # S_i for the tokens of the current round
        self._feats: list[np.ndarray] = []  # predictor features of the kept tokens, for online learning
        self._ended_confident = False

    def start_round(self, link: LinkState) -> None:
        super().start_round(link)
        self._survive = []
        self._feats = []
        self._ended_confident = False

    def p_accept(self, token: DraftToken, position: int) -> float:
        return self.predictor.p_accept(token.top1, token.entropy, position, self.rate)

    def step(self, tokens: list[DraftToken]) -> Action:
        pos = len(tokens) - 1
        tok = tokens[-1]
        a = self.p_accept(tok, pos)
        s_prev = self._survive[pos - 1] if pos > 0 and len(self._survive) >= pos else 1.0
        s = s_prev * a
        # The first token is free (its logits come from feeding the committed context, which the next round
        # needs anyway) and sending it is what keeps the predictor learning, so only later ones are withheld.
        if a < self.min_send and pos > 0:
            return Action.DROP
        del self._survive[pos:]
        del self._feats[pos:]
        self._survive.append(s)
        self._feats.append(features(tok.top1, tok.entropy, pos, self.rate))
        if len(tokens) >= min(self.max_draft, self.link.max_draft):
            self._ended_confident = a >= 0.5  # cut by the cap while still confident: worth drafting ahead
            return Action.SEND
        if self._worth_more(len(tokens), s, 1.0 + sum(self._survive)):
            return Action.CONTINUE
        self._ended_confident = a >= 0.5 and s >= 0.5
        return Action.SEND

    def round_ms(self, k: int) -> float:
        """Predicted round time with k draft tokens, from the verdict leaving the server to the next one."""
        link = self.link
        c = max(link.draft_ms, 1e-3)
        f = link.launch_in_ms
        if f <= 0.0:
            return k * c + link.rtt_ms + link.wait_hint_ms + link.verify_ms
        late = link.rtt_ms + k * c - f  # how far after the hinted launch the round would arrive
        missed = 0 if late <= 0.0 else math.ceil(late / f)
        return f * (missed + 2)  # the launch it joins, F + missed*S, plus its step S (S = F)

    def _worth_more(self, k: int, s: float, expected: float) -> bool:
        """Does some k' in (k, cap] pay better than sending k tokens now (s: their survival, E(k) = expected)?

        The next tokens' acceptance, before we see them, is the session's running rate: the honest prior. A
        predicted rejection (small s) stops the round here; a long round (slow link, long wait) makes even a
        doubtful extra token worth its draft time; the server's price is paid for every verified token."""
        link = self.link
        c = max(link.draft_ms, 1e-3)
        price = max(0.0, link.price_ms)
        if self.past_gpu_cap(k):
            return False
        if link.launch_in_ms <= 0.0:  # the price rule itself: one token of look-ahead is exact (docstring)
            return s * self.rate * self.round_ms(k) > (c + price) * expected
        cap = min(self.max_draft, link.max_draft)
        base = self.round_ms(k)
        gain, surv = 0.0, s
        for extra in range(1, cap - k + 1):
            surv *= self.rate
            gain += surv
            # E(k')/(T(k') + extra*price) > E(k)/T(k), cross-multiplied (both times are positive)
            if (expected + gain) * base > expected * (self.round_ms(k + extra) + extra * price):
                return True
        return False

    def past_gpu_cap(self, k: int) -> bool:
        """The GPU cap: on a loaded server (positive price), is k at least the draft length that costs a
        compute-bound GPU least per committed token, at the running acceptance rate?"""
        if self.round_overhead <= 0.0 or self.link.price_ms <= 0.0:
            return False
        return k >= gpu_draft_len(self.rate, self.round_overhead, min(self.max_draft, self.link.max_draft))

    def observe(self, sent: list[DraftToken], accepted: int) -> None:
        # Every accepted token is a 1; the first rejected one a 0; tokens after it were never judged.
        for i in range(min(len(sent), accepted + 1)):
            ok = 1.0 if i < accepted else 0.0
            self.rate = self.rate_ema * self.rate + (1 - self.rate_ema) * ok
            if self.online_lr and i < len(self._feats):
                self.predictor.update(self._feats[i], ok, self.online_lr)

    def siblings(self, tokens: list[DraftToken]) -> int:
        """The prefix of positions whose siblings pay their verify price together (module docstring, "Token
        trees"): siblings go with the first m tokens, and the first rejection is often deep in a round (the
        controller stops right before a predicted one), so an early sibling that does not pay alone may be worth
        sending for the later ones it opens the way to."""
        k = min(self.tree, len(tokens), len(self._survive))
        if k == 0:
            return 0
        expected = 1.0 + sum(self._survive[: len(tokens)])
        rate_ms = self.round_ms(len(tokens)) / expected  # this session's time per committed token
        # each sibling costs the price and at least MIN_SIBLING_P of a committed token (frame bytes, a slot)
        cost = max(max(0.0, self.link.price_ms), MIN_SIBLING_P * rate_ms)
        best = net = 0.0
        m, before = 0, 1.0
        for j in range(k):
            miss = before - self._survive[j]  # token j is reached and rejected
            net += miss * self.sibling_hit * rate_ms - cost
            before = self._survive[j]
            if net > best:
                best, m = net, j + 1
        return m

    def observe_sibling(self, hit: bool) -> None:
        self.sibling_hit = self.rate_ema * self.sibling_hit + (1 - self.rate_ema) * (1.0 if hit else 0.0)

    def ahead_budget(self) -> int:
        if not self.draft_ahead or not self._ended_confident:
            return 0
        # Only as many tokens as fit in the expected wait: beyond that they would delay the next round.
        expected_wait = self.link.rtt_ms + self.link.wait_hint_ms + self.link.verify_ms
        return max(0, min(self.draft_ahead, int(expected_wait / max(self.link.draft_ms, 1e-3))))


def gpu_draft_len(alpha: float, overhead: float, cap: int) -> int:
    """The k in [1, cap] minimizing (k + 1 + overhead) / E(k): verified tokens plus a round's fixed cost (in
    tokens' worth) per committed token, E(k) = Σ_{i=0..k} α^i. The ratio falls then rises in k, so the first k
    where it stops falling is the minimum."""
    a = min(max(alpha, 0.0), 0.999)
    best, best_cost = 1, math.inf
    for k in range(1, max(1, cap) + 1):
        cost = (k + 1 + overhead) * (1.0 - a) / (1.0 - a ** (k + 1))
        if cost >= best_cost:
            break
        best, best_cost = k, cost
    return best


def make_controller(spec: str | Controller | None, predictor: RejectionPredictor | None = None) -> Controller:
    """'wisp', 'wisp+ahead', 'wisp+cap', 'wisp+tree', 'fixed:K' (or a Controller, returned as is)."""
    if isinstance(spec, Controller):
        return spec
    spec = (spec or "wisp").strip().lower()
    if spec == "wisp":
        return Wisp(predictor)
    if spec in ("wisp+ahead", "wisp-ahead"):
        return Wisp(predictor, draft_ahead=8)
    if spec == "wisp+cap":
        return Wisp(predictor, round_overhead=ROUND_OVERHEAD)
    if spec == "wisp+tree":
        return Wisp(predictor, tree=TREE_SIBLINGS)
    if spec.startswith("fixed:"):
        try:
            return FixedK(int(spec.split(":", 1)[1]))
        except ValueError:
            pass
    raise ValueError(f"unknown controller {spec!r}: use wisp, wisp+ahead, wisp+cap, wisp+tree or fixed:K")
