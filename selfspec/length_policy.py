"""How many tokens to draft each round, for each sequence of the batch.

A round of B sequences starts with `begin_round(B)`. A sequence may have copies on offer from two sources,
its own text and the traffic memory: `choose_copy(proposals)` picks the one it offers, and
`copy_drafts(offers)` says how many of each offer to verify; for the others, `start_round()` says
whether to call the head at all, then `keep(kept, top_prob, entropy)` decides on each candidate draft of
a sequence (after the head produced it, before it is committed to verification; `kept` is that
sequence's list of what the drafts kept so far are worth, which `keep` extends). After verification the
engine reports each sequence's round, `observe(RoundOutcome)`, which policies learn from through `update`
(head drafts) and `update_copies` (every proposal, verified or not, judged against what was emitted), and
what the round cost: `observe_round` (its width and seconds) and `observe_goodput` (tokens per second).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from selfspec.proposal import MEMORY, TEXT, Proposal

NO_COPY = Proposal([], 0)
from selfspec.pass_costs import CostTable, PassCosts


@dataclass(frozen=True)
class Shadow:
    """The head's greedy draft in a round where the policy drafted nothing: judged against the token the
    verifier emits anyway, so calibrating costs one head call, never a longer verification."""
    confidence: float
    token: int


@dataclass(frozen=True)
class RoundOutcome:
    proposals: list[Proposal]  # the round's copy proposals (own text, memory), verified or not
    confidences: list[float]  # top probability of each head draft verified
    shadow: Shadow | None
    n_accepted: int
    emitted: list[int]  # accepted drafts and the verifier's own token


class LengthPolicy:
    """Fixed γ: always draft max_drafts tokens (γ=0 is plain autoregressive decoding)."""

    name = "fixed"

    def __init__(self, max_drafts: int):
        if max_drafts < 0:
            raise ValueError(f"gamma must be >= 0, got {max_drafts}")
        self.max_drafts = max_drafts
        self.batch = 1

    def begin_round(self, batch: int) -> None:
        """A round of `batch` sequences starts."""
        self.batch = batch

    def start_round(self) -> bool:
        """Whether the sequences without copies call the head this round."""
        return self.max_drafts > 0

    def keep(self, kept: list[float], top_prob: float, entropy: float) -> bool:
        """Whether a sequence verifies its next head draft (`kept`: the drafts it keeps so far)."""
        return self._kept(kept, top_prob, True)

    @staticmethod
    def _kept(kept: list[float], worth: float, keep: bool) -> bool:
        if keep:
            kept.append(worth)
        return keep

    def observe(self, outcome: RoundOutcome) -> None:
        """All feedback from one verified round."""
        for proposal in outcome.proposals:  # judged also when not verified: against the tokens emitted anyway
            self.update_copies(proposal, outcome.emitted)
        if outcome.confidences:
            self.update(outcome.confidences, outcome.n_accepted)
        elif outcome.shadow is not None:
            self.update([outcome.shadow.confidence], int(outcome.shadow.token == outcome.emitted[0]))

    def update(self, top_probs: list[float], n_accepted: int) -> None:
        pass

    def choose_copy(self, proposals: list[Proposal]) -> Proposal:
        """Which of a sequence's copy proposals it offers (none: an empty one): the longest match, its own
        text's on a tie."""
        return max(proposals, key=lambda p: p.ngram, default=NO_COPY)

    def copy_drafts(self, offers: list[Proposal]) -> list[int]:
        """How many copied drafts each sequence verifies of the proposal it offers."""
        return [min(len(p.tokens), self.max_drafts) for p in offers]

    def update_copies(self, proposal: Proposal, emitted: list[int]) -> None:
        """A round had this copy proposal (verified or not) and emitted these tokens."""

    def observe_round(self, drafts: int, seconds: float) -> None:
        """A round of this batch without head calls, its widest block `drafts` copies wide, took `seconds`."""

    def observe_goodput(self, drafted: bool, tokens: int, seconds: float) -> None:
        """A round of this batch emitted `tokens` in `seconds`; `drafted`: it called the head or verified copies."""


class ConfidenceThreshold(LengthPolicy):
    """SVIP / AdaEDL style: stop drafting once the head is unsure (entropy high or top probability low)."""

    name = "threshold"

    def __init__(self, max_drafts: int, min_top_prob: float = 0.4, max_entropy: float = 2.0):
        super().__init__(max_drafts)
        self.min_top_prob, self.max_entropy = min_top_prob, max_entropy

    def keep(self, kept: list[float], top_prob: float, entropy: float) -> bool:
        return self._kept(kept, top_prob, top_prob >= self.min_top_prob and entropy <= self.max_entropy)


ROUND_SMOOTHING = 0.1  # weight of a new round in the moving averages of measured rounds
GOODPUT_ROUNDS = 16  # rounds of each kind (drafting, plain) at a batch size before their goodput decides
GOODPUT_PROBE = 0.05  # share of rounds that run the other kind, so that both stay measured
GOODPUT_FIRST_PROBE = 0.25  # ... until plain rounds are measured at that batch size
MATCH_BINS = 8  # copies' acceptance is learnt per suffix match length, longer matches in the last bin


@dataclass(frozen=True)
class Calibration:
    """How CostAware learns what the head's confidence is worth."""
    explore: float = 0.03  # fraction of sequence-rounds that call a head not expected to pay
    prior_weight: float = 4.0  # observations the raw confidence is worth as a prior
    bins: int = 10  # confidence bins
    seed: int = 0  # of the exploration coin
    copy_prior: float = 0.3  # acceptance of copied drafts before any is judged
    measured: bool = True  # what rounds measured while serving (times, goodput) corrects the cost model


class CostAware(LengthPolicy):
    """Draft only as much as pays for the whole batch, down to zero: goodput, not acceptance, decides.

    Acceptance of a draft is estimated per source: the head's from its top probability, calibrated
    online per confidence bin (the raw confidence acts as a prior worth `prior_weight` observations);
    copies' per source (own text, traffic memory) and suffix match length, which also decides which of
    a sequence's proposals it offers. A round's value is expected tokens / expected time, with pass costs
    measured at this batch size (CostTable): uneven per width at batch 1 (verifying 3 tokens can cost more
    than 5), and, as the batch grows, each draft costs more of what a plain token costs, until speculation
    stops paying and the policy drafts nothing. When no confidence the head shows would pay, the head is
    not called at all, except in a small `explore` fraction of rounds. A round that calls the head but
    drafts nothing still learns from its `Shadow`. Above all that, the goodput measured while serving has
    the last word at each batch size: where drafting rounds emitted fewer tokens per second than plain
    ones, the round drafts nothing (`_plain_pays`).
    """

    name = "cost_aware"

    def __init__(self, costs: PassCosts | CostTable, max_drafts: int, calibration: Calibration = Calibration()):
        self.table = CostTable.of(costs)
        super().__init__(min(max_drafts, self.table.widths - 1))
        c = calibration
        # copied drafts: per (source, matched suffix length up to MATCH_BINS), accepted / judged positions
        self.copy_stats = {(source, m): [c.copy_prior * c.prior_weight, c.prior_weight]
                           for source in (TEXT, MEMORY) for m in range(1, MATCH_BINS + 1)}
        self.explore, self.prior_weight, self.bins, self.measured = c.explore, c.prior_weight, c.bins, c.measured
        self.accepted = [0.0] * c.bins
        self.trials = [0.0] * c.bins
        self.seen = [1.0] * c.bins  # how often the head shows each confidence (uniform prior)
        self.rng = random.Random(c.seed)
        self._head_value: dict[int, float] = {}  # per batch size, until the next update
        self._seconds: dict[tuple[int, int], float] = {}  # (batch, drafts) -> a copy round's measured seconds
        # (batch bucket, drafted) -> [rounds, tokens/s average]; buckets 1, 2, 3-4, 5-8, ...: a batch that
        # changes size as requests come and go still gathers enough rounds in each
        self._goodput: dict[tuple[int, bool], list[float]] = {}
        self._plain = False  # this round drafts nothing: measured goodput says plain rounds are faster

    def begin_round(self, batch: int) -> None:
        super().begin_round(batch)
        self._plain = self._plain_pays()

    def _plain_pays(self) -> bool:
        """The last word on drafting at this batch size is the goodput rounds showed: once drafting rounds
        and plain ones are both measured, the slower kind runs only in a GOODPUT_PROBE share of rounds.
        The cost model above can be wrong about a machine (context length, padding, what a pass costs
        next to the others); tokens per second measured while serving cannot (vLLM #26504)."""
        drafting, plain = (self._goodput.get((_bucket(self.batch), kind)) for kind in (True, False))
        if not self.measured or drafting is None or drafting[0] < GOODPUT_ROUNDS:
            return False
        if plain is None or plain[0] < GOODPUT_ROUNDS:
            return self.rng.random() < GOODPUT_FIRST_PROBE  # plain rounds measured too
        return (drafting[1] < plain[1]) != (self.rng.random() < GOODPUT_PROBE)

    def observe_goodput(self, drafted: bool, tokens: int, seconds: float) -> None:
        key, rate = (_bucket(self.batch), drafted), tokens / seconds
        old = self._goodput.get(key)
        self._goodput[key] = [1, rate] if old is None else [old[0] + 1, old[1] + ROUND_SMOOTHING * (rate - old[1])]

    @property
    def costs(self) -> PassCosts:
        """The pass costs at this round's batch size."""
        return self.table.at(self.batch)

    def _bin(self, top_prob: float) -> int:
        return min(int(top_prob * self.bins), self.bins - 1)

    def acceptance(self, top_prob: float) -> float:
        b = self._bin(top_prob)
        return (self.accepted[b] + self.prior_weight * top_prob) / (self.trials[b] + self.prior_weight)

    def _best_rate(self, accept_probs: list[float], a_next: float, n_heads_done: int) -> float:
        """Best tokens/s over every round length >= len(accept_probs), later drafts accepted with a_next."""
        best, expected, survive = 0.0, 1.0, 1.0
        for a in accept_probs:
            survive *= a
            expected += survive
        for n in range(len(accept_probs), self.max_drafts + 1):
            if n > len(accept_probs):
                survive *= a_next
                expected += survive
            best = max(best, expected / self.costs.round_time(n, max(n, n_heads_done)))
        return best

    def start_round(self) -> bool:
        if self.batch not in self._head_value:
            self._head_value[self.batch] = self._value_of_head()
        head_pays = self._head_value[self.batch] > 1.0 / self.costs.round_time(0, 0)
        # exploring calls the head for every sequence of the batch: explore / batch of the rounds keeps the
        # share of sequence-rounds (what calibration learns from, and what exploring costs) the same
        return self.max_drafts > 0 and not self._plain and (head_pays or self.rng.random() < self.explore / self.batch)

    def keep(self, kept: list[float], top_prob: float, entropy: float) -> bool:
        self.seen[self._bin(top_prob)] += 1
        a = self.acceptance(top_prob)
        stop_rate = self._best_rate(kept, 0.0, len(kept) + 1)
        go_rate = self._best_rate(kept + [a], a, len(kept) + 1)
        return self._kept(kept, a, go_rate > stop_rate)

    def update(self, top_probs: list[float], n_accepted: int) -> None:
        # Only positions up to the first reject were observed; later ones say nothing.
        for j, p in enumerate(top_probs[: n_accepted + 1]):
            b = self._bin(p)
            self.trials[b] += 1
            self.accepted[b] += j < n_accepted
        self._head_value.clear()

    def copy_acceptance(self, match: int, source: str = TEXT) -> float:
        accepted, judged = self.copy_stats[source, min(match, MATCH_BINS)]
        return accepted / judged

    def choose_copy(self, proposals: list[Proposal]) -> Proposal:
        """The proposal with the most tokens expected accepted, up to max_drafts."""
        def expected(p: Proposal) -> float:
            a = self.copy_acceptance(p.ngram, p.source)
            return sum(a ** j for j in range(1, min(len(p.tokens), self.max_drafts) + 1))
        return max(proposals, key=expected, default=NO_COPY)

    def copy_drafts(self, offers: list[Proposal]) -> list[int]:
        """The block width with the best expected tokens/s for the batch, each sequence's copies accepted
        one after another with the calibrated rate of its match length (a sequence offering fewer copies
        verifies what it has), or none when plain decoding is faster: the round's other sequences count as
        one token each, and every sequence pays for the widest block."""
        if self._plain:
            return [0] * len(offers)
        rates = [self.copy_acceptance(p.ngram, p.source) for p in offers]
        available = [len(p.tokens) for p in offers]
        others = self.batch - len(offers)
        best, best_rate = 0, self.batch / self._copy_seconds(0)
        for width in range(1, min(max(available, default=0), self.max_drafts) + 1):
            expected = others + sum(sum(a ** j for j in range(min(width, n) + 1)) for a, n in zip(rates, available))
            if expected / self._copy_seconds(width) > best_rate:
                best, best_rate = width, expected / self._copy_seconds(width)
        return [min(best, n) for n in available]

    def observe_round(self, drafts: int, seconds: float) -> None:
        # Goodput is judged on what rounds cost while serving: the start-up table is timed at one context
        # length, and longer contexts, padding and per-sequence work change what a wider block costs.
        key = (self.batch, drafts)
        old = self._seconds.get(key)
        self._seconds[key] = seconds if old is None else old + ROUND_SMOOTHING * (seconds - old)

    def _copy_seconds(self, drafts: int) -> float:
        """What a round of the batch with copies `drafts` wide takes: as measured while serving, else the
        start-up table's prediction scaled by how the measured plain rounds compare with their prediction."""
        measured = self._seconds.get((self.batch, drafts)) if self.measured else None
        if measured is not None:
            return measured
        predicted = self.costs.copy_round_time(drafts) * self.batch
        plain = self._seconds.get((self.batch, 0)) if self.measured else None
        return predicted * plain / (self.costs.copy_round_time(0) * self.batch) if plain is not None else predicted

    def update_copies(self, proposal: Proposal, emitted: list[int]) -> None:
        # Positions are judged up to the first disagreement with what was emitted, verified or not.
        proposed, agree = proposal.tokens, 0
        while agree < min(len(proposed), len(emitted)) and proposed[agree] == emitted[agree]:
            agree += 1
        stats = self.copy_stats[proposal.source, min(proposal.ngram, MATCH_BINS)]
        stats[0] += agree
        stats[1] += min(agree + 1, len(proposed), len(emitted))

    def _value_of_head(self) -> float:
        """Expected tokens/s of a round that calls the head, over the confidences the head shows."""
        total = sum(self.seen)
        value = 0.0
        for b in range(self.bins):
            a = self.acceptance((b + 0.5) / self.bins)
            value += self.seen[b] / total * max(self._best_rate([a], a, 1), 1.0 / self.costs.round_time(0, 1))
        return value



def _bucket(batch: int) -> int:
    """The power of two at or above `batch`."""
    return 1 << (batch - 1).bit_length()
