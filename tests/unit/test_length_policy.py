"""The cost-aware policy drafts only what pays: nothing for a useless head, long drafts for a good one,
and never a round length whose verification shape is too slow."""
import pytest

from selfspec.length_policy import GOODPUT_FIRST_PROBE, GOODPUT_PROBE, GOODPUT_ROUNDS, Calibration, ConfidenceThreshold, CostAware, LengthPolicy, RoundOutcome
from selfspec.pass_costs import CostTable, PassCosts
from selfspec.proposal import MEMORY, Proposal


def offer(match: int, available: int, source: str = "text") -> Proposal:
    """A copy proposal of `available` tokens after a suffix match `match` long."""
    return Proposal(list(range(available)), match, source)

# Shaped like the 2-core CPU: a trunk step ~0.11 of a full step, the head ~0.16, verifying 2-3 tokens slow.
COSTS = PassCosts(trunk=0.11, head=0.16, verify=[0.0, 0.89, 1.5, 1.7, 1.3, 1.3])


def run_rounds(policy, accept: bool, confidence: float, rounds: int = 2000) -> tuple[int, list[int]]:
    """Drive the policy as the engine does; a round that called the head but kept nothing reports its
    shadow draft (accepted or not) like the engine."""
    head_calls, lengths = 0, []
    for _ in range(rounds):
        kept = []
        if policy.start_round():
            head_calls += 1
            while len(kept) < policy.max_drafts and policy.keep(kept, confidence, 0.1):
                pass
            policy.update([confidence] * max(len(kept), 1), len(kept) if accept else 0)
        lengths.append(len(kept))
    return head_calls, lengths


def test_useless_head_is_soon_not_called():
    policy = CostAware(COSTS, 4, Calibration(explore=0.03, seed=1))
    head_calls, lengths = run_rounds(policy, accept=False, confidence=0.95)
    assert head_calls < 0.06 * 2000  # the exploring fraction plus the first rounds that calibrate
    assert sum(lengths[-1000:]) == 0


def test_good_head_drafts_to_the_cap():
    policy = CostAware(COSTS, 4, Calibration(seed=1))
    _, lengths = run_rounds(policy, accept=True, confidence=0.95)
    assert lengths[-100:] == [4] * 100


def test_slow_verify_shapes_are_skipped():
    # Each draft accepted with probability 0.6. Tokens/time by round length n (by hand from COSTS):
    # n=0 0.862, n=1 0.851, n=2 0.834, n=3 0.980, n=4 0.926. A myopic rule would not even start
    # (n=1 < n=0); looking past the slow shapes the policy goes on to 3, and once the head has been
    # called for a 4th candidate that cost is sunk: 4 drafts (0.926) beat stopping at 3 (0.914).
    policy = CostAware(COSTS, 4, Calibration(prior_weight=1e9))  # trust the confidence as the acceptance estimate
    assert policy.start_round()
    kept = []
    while len(kept) < 4 and policy.keep(kept, 0.6, 0.5):
        pass
    assert len(kept) == 4


def test_threshold_policy_stops_on_low_confidence():
    policy = ConfidenceThreshold(6, min_top_prob=0.5, max_entropy=1.0)
    kept = []
    assert policy.keep(kept, 0.9, 0.2) and not policy.keep(kept, 0.4, 0.2) and not policy.keep(kept, 0.9, 1.5)
    assert kept == [0.9]


def test_copied_drafts_only_when_their_match_length_pays():
    """Copied drafts cost a trunk block and a longer verification, no head: a match length whose
    copies are mostly wrong is not verified (plain decoding instead), one whose copies are right is
    verified to the cap; both learned from outcomes, including unverified proposals judged against
    the emitted token."""
    costs = PassCosts(trunk=0.11, head=0.16, verify=COSTS.verify, trunk_block=[0.0, 0.11, 0.15, 0.17, 0.18, 0.19])
    policy = CostAware(costs, 4)
    for _ in range(200):
        for match, right in ((1, False), (4, True)):
            (n,) = policy.copy_drafts([offer(match, 4)])
            proposal = [7, 8, 9, 10]
            emitted = proposal[:n + 1] if right else [99]  # right: the model emits the copy anyway
            policy.update_copies(Proposal(proposal, match), emitted)
    assert policy.copy_drafts([offer(1, 4)]) == [0]
    assert policy.copy_acceptance(1) < 0.05
    assert policy.copy_drafts([offer(4, 4)]) == [4] and policy.copy_drafts([offer(4, 2)]) == [2]
    assert policy.copy_acceptance(4) > 0.9
    assert ConfidenceThreshold(4).copy_drafts([offer(1, 3)]) == [3]  # the other policies verify every copy offered



def test_each_copy_source_is_calibrated_apart_and_the_better_one_offered():
    """The memory's copies and the request's own are judged apart, per match length: with the memory's
    4-matches right and the text's wrong, the memory's proposal is offered and verified, the text's is not
    verified alone; the fixed policy offers the longest match, its own text's on a tie."""
    costs = PassCosts(trunk=0.11, head=0.16, verify=COSTS.verify, trunk_block=[0.0, 0.11, 0.15, 0.17, 0.18, 0.19])
    policy = CostAware(costs, 4)
    text, memory = Proposal([7, 8, 9, 10], 4), Proposal([1, 2, 3, 4], 4, MEMORY)
    for _ in range(200):  # the model goes on as the memory said; both proposals are judged every round
        policy.observe(RoundOutcome([text, memory], [], None, 0, [1, 2, 3, 4, 5]))
    assert policy.copy_acceptance(4, MEMORY) > 0.9 and policy.copy_acceptance(4) < 0.05
    assert policy.copy_acceptance(2, MEMORY) == pytest.approx(0.3)  # other lengths: still the prior
    assert policy.choose_copy([text, memory]) is memory
    assert policy.copy_drafts([memory]) == [4] and policy.copy_drafts([text]) == [0]
    assert policy.choose_copy([]).tokens == []
    fixed = LengthPolicy(4)
    assert fixed.choose_copy([text, memory]) is text
    assert fixed.choose_copy([Proposal([1], 2), Proposal([2], 5, MEMORY)]).source == MEMORY

# Batch-aware costs (issue 29). Whole-pass seconds over `batch` sequences, made up: at batch 1 a pass is
# memory bound (verifying 5 tokens costs what 1 does), at batch 8 compute bound (a pass costs in proportion
# to the tokens it carries), so speculation pays alone and not in a full batch.
BATCH_COSTS = CostTable({
    1: PassCosts(trunk=0.1, head=0.05, verify=[0.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                 trunk_block=[0.0, 0.1, 0.1, 0.1, 0.1, 0.1]),
    8: PassCosts(trunk=0.2, head=0.1, verify=[0.0, 2.0, 4.0, 6.0, 8.0, 10.0],
                 trunk_block=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0], batch=8),
})
# trusted estimates (prior_weight 1e9: the prior is the acceptance), no exploration; one confidence bin, so the
# head's value is that of its bin centre, confidence 0.5
TRUSTED = Calibration(explore=0.0, prior_weight=1e9, bins=1, copy_prior=0.8)


def test_copies_pay_alone_and_not_in_a_full_batch():
    # Copies accepted with 0.8 each: expected tokens of a round with w copies 1, 1.8, 2.44, 2.952, 3.3616.
    # Batch 1: every width costs 0.1 + 1.0 = 1.1, so the widest (4) is best.
    # Batch 8, each row offering: a sequence's share (0.2 + 2.0)(w + 1) / 8 = 0.275 (w + 1); plain decoding gives
    # 8 / 0.275 = 29.1 tokens/s, w copies 29.1 * S(w) / (w + 1) = 29.1 * (0.9, 0.81, 0.74, 0.67): none pays.
    policy = CostAware(BATCH_COSTS, 4, TRUSTED)
    assert policy.max_drafts == 4 and policy.copy_acceptance(1) == pytest.approx(0.8)
    policy.begin_round(1)
    assert policy.copy_drafts([offer(1, 4)]) == [4]
    assert policy.copy_drafts([offer(1, 2)]) == [2]  # what it has
    policy.begin_round(8)
    assert policy.copy_drafts([offer(1, 4)] * 8) == [0] * 8
    assert policy.copy_drafts([offer(1, 4)]) == [0]  # one offering, the 7 others plain: still none
    policy.begin_round(1)
    assert policy.copy_drafts([offer(1, 4)]) == [4]


def test_head_drafts_alone_and_is_not_called_in_a_full_batch():
    # Acceptance 0.5 (the single bin's centre, trusted). Batch 1, round_time(n, heads) = 0.1 (1 + n) + 0.05 heads + 1:
    # n drafts give 1.5 / 1.25 = 1.2, 1.75 / 1.4 = 1.25, 1.875 / 1.55 = 1.210, 1.9375 / 1.7 = 1.140 tokens/s, against
    # 1 / 1.1 = 0.909 without the head: it is called. Drafting at confidence 0.5 goes on while the best rate of
    # going on beats stopping there (the head calls made are sunk): 1.25 > 0.870, 1.25 > 1.154, 1.2097 > 1.2069
    # (3 drafts, 3 calls: 1.875 / 1.55 against 2 drafts after 3 calls: 1.75 / 1.45), then 1.140 < 1.172: 3 drafts.
    # Batch 8, a sequence's share (0.2 (1 + n) + 0.1 heads + verify[n + 1]) / 8: 1 draft gives 1.5 / 0.5625 = 2.67,
    # more less, and calling the head to draft nothing 8 / 2.3 = 3.48, against 8 / 2.2 = 3.64 without it: not called.
    policy = CostAware(BATCH_COSTS, 4, TRUSTED)
    policy.begin_round(1)
    assert policy.start_round()
    kept = []
    while len(kept) < 4 and policy.keep(kept, 0.5, 0.5):
        pass
    assert len(kept) == 3
    policy.begin_round(8)
    assert not any(policy.start_round() for _ in range(100))
    policy.begin_round(1)
    assert policy.start_round()


def test_cost_table_interpolates_between_batch_sizes_and_keeps_per_sequence_cost_past_them():
    one = PassCosts(trunk=0.1, head=0.05, verify=[0.0, 1.0, 1.0], trunk_block=[0.0, 0.1, 0.1])
    two = PassCosts(trunk=0.3, head=0.06, verify=[0.0, 1.0, 2.0], trunk_block=[0.0, 0.3, 0.6], batch=2)
    eight = PassCosts(trunk=0.9, head=0.18, verify=[0.0, 4.0, 5.0], trunk_block=[0.0, 0.9, 1.2], batch=8)
    table = CostTable({1: one, 2: two, 8: eight})
    assert table.at(1) is one and table.at(2) is two and table.at(8) is eight and table.widths == 2
    # batch 4 lies 1/3 of the way from 2 to 8: trunk 0.3 * 2/3 + 0.9 / 3 = 0.5, head 0.04 + 0.06 = 0.1,
    # verify [0, 2/3 + 4/3, 4/3 + 5/3] = [0, 2, 3], trunk_block [0, 0.2 + 0.3, 0.4 + 0.4] = [0, 0.5, 0.8]
    four = table.at(4)
    assert four.batch == 4
    assert (four.trunk, four.head) == (pytest.approx(0.5), pytest.approx(0.1))
    assert four.verify == pytest.approx([0.0, 2.0, 3.0]) and four.trunk_block == pytest.approx([0.0, 0.5, 0.8])
    # a sequence's share of a round: (0.5 * 2 + 0.1 + 3.0) / 4 = 1.025
    assert four.round_time(1, 1) == pytest.approx(1.025)
    # past the largest measured batch, the same cost per sequence: batch 16 costs twice batch 8
    sixteen = table.at(16)
    assert sixteen.batch == 16 and sixteen.trunk == pytest.approx(1.8)
    assert sixteen.verify == pytest.approx([0.0, 8.0, 10.0])
    assert sixteen.round_time(1, 1) == pytest.approx(eight.round_time(1, 1))
    assert sixteen.round_time(1, 1) == pytest.approx((0.9 * 2 + 0.18 + 5.0) / 8)
    assert sixteen.copy_round_time(1) == pytest.approx(eight.copy_round_time(1)) == pytest.approx((1.2 + 5.0) / 8)
    # one PassCosts is a table of its own batch size, extrapolated the same way
    assert CostTable.of(one).at(3).round_time(1, 1) == pytest.approx(one.round_time(1, 1))
    with pytest.raises(ValueError, match="batch 1"):
        CostTable({2: two})


def test_rows_without_copies_count_one_token_each():
    # Batch 2, a sequence's share of a round copy_round_time(w) = verify[w + 1] / 2 (the trunk block free here);
    # copies accepted with 0.8: S(w) = 1, 1.8, 2.44, 2.952, 3.3616. Plain decoding: 2 / 0.5 = 4 tokens/s.
    def policy(verify):
        table = CostTable({1: BATCH_COSTS.at(1), 2: PassCosts(trunk=0.1, head=0.05, verify=verify,
                                                               trunk_block=[0.0] * 6, batch=2)})
        p = CostAware(table, 4, TRUSTED)
        p.begin_round(2)
        return p

    cheap_second = policy([0.0, 1.0, 1.05, 2.0, 3.0, 4.0])
    # one row offers, the other none (one token): w=1 (1 + 1.8) / 0.525 = 5.33 > 4, w=2 3.44 / 1.0, w=3 3.95 / 1.5:
    # 1 copy. (Counting the other row as nothing: 1.8 / 0.525 = 3.43 < 4, no copy.)
    assert cheap_second.copy_drafts([offer(1, 4)]) == [1]
    steady = policy([0.0, 1.0, 1.5, 2.0, 2.5, 3.0])
    # one row offers: w = 1..4 gives 2.8 / 0.75 = 3.73, 3.44 / 1.0, 3.95 / 1.25 = 3.16, 4.36 / 1.5 = 2.91, all < 4: none
    assert steady.copy_drafts([offer(1, 4)]) == [0]
    # both offer: 3.6 / 0.75 = 4.8, 4.88 / 1.0 = 4.88, 5.90 / 1.25 = 4.72, 6.72 / 1.5 = 4.48: 2 copies each
    assert steady.copy_drafts([offer(1, 4), offer(1, 4)]) == [2, 2]
    # the second has one copy only: w=1 3.6 / 0.75 = 4.8, w=2 (2.44 + 1.8) / 1.0 = 4.24: 1 each
    assert steady.copy_drafts([offer(1, 4), offer(1, 1)]) == [1, 1]


def test_copy_widths_are_judged_on_measured_round_times():
    # steady costs at batch 2 (above): one offering row, copies accepted with 0.8, 2 copies when both offer.
    table = CostTable({1: BATCH_COSTS.at(1), 2: PassCosts(trunk=0.1, head=0.05, verify=[0.0, 1.0, 1.5, 2.0, 2.5, 3.0],
                                                           trunk_block=[0.0] * 6, batch=2)})
    policy = CostAware(table, 4, TRUSTED)
    policy.begin_round(2)
    assert policy.copy_drafts([offer(1, 4), offer(1, 4)]) == [2, 2]
    # plain rounds measured at the table's 1.0 s, but 2-wide ones at 2.5 s (a long context, say): w=2 gives
    # 4.88 / 2.5 = 1.95 < 2 tokens/s; w=1 (table scaled by 1.0) 3.6 / 1.5 = 2.4 > 2: one copy each
    policy.observe_round(0, 1.0)
    policy.observe_round(2, 2.5)
    assert policy.copy_drafts([offer(1, 4), offer(1, 4)]) == [1, 1]
    # plain rounds measured at twice the table: every unmeasured width scales alike (the choice stays 2 each);
    # the moving average moves a tenth of the way per round
    slow = CostAware(table, 4, TRUSTED)
    slow.begin_round(2)
    slow.observe_round(0, 2.0)
    assert slow._copy_seconds(1) == pytest.approx(3.0) and slow._copy_seconds(3) == pytest.approx(5.0)
    assert slow.copy_drafts([offer(1, 4), offer(1, 4)]) == [2, 2]
    slow.observe_round(0, 3.0)
    assert slow._copy_seconds(0) == pytest.approx(2.1)
    assert LengthPolicy(4).observe_round(1, 1.0) is None  # the other policies do not judge costs


def test_measured_goodput_has_the_last_word_at_each_batch_size():
    """Copies that the cost model says pay (accepted with 0.8, batch 1 costs) are still dropped at a batch
    size whose drafting rounds were measured slower than its plain ones, in all but a probe share of rounds;
    at a batch size where drafting measured faster, and before both kinds are measured, the model decides."""
    policy = CostAware(BATCH_COSTS, 4, Calibration(explore=0.0, prior_weight=1e9, bins=1, copy_prior=0.8, seed=1))
    policy.begin_round(1)
    assert policy.copy_drafts([offer(1, 4)]) == [4] and policy.start_round()
    for drafted, tokens, seconds in [(True, 5, 1.0), (False, 4, 0.5)] * GOODPUT_ROUNDS:  # 5 vs 8 tokens/s
        policy.observe_goodput(drafted, tokens, seconds)
    for drafted, tokens, seconds in [(True, 9, 1.0), (False, 4, 0.5)] * GOODPUT_ROUNDS:
        policy.begin_round(2)  # batch 2: drafting 9 tokens/s against plain 8
        policy.observe_goodput(drafted, tokens, seconds)
    policy.begin_round(3)  # 3 and 4 share a bucket: 8 drafting rounds at each are its 16
    for _ in range(GOODPUT_ROUNDS // 2):
        policy.observe_goodput(True, 6, 1.0)
    policy.begin_round(4)
    for _ in range(GOODPUT_ROUNDS // 2):
        policy.observe_goodput(True, 6, 1.0)
    first = sum(policy.begin_round(4) or policy._plain for _ in range(400))  # plain rounds unmeasured: probed often
    assert 400 * GOODPUT_FIRST_PROBE / 2 < first < 400 * GOODPUT_FIRST_PROBE * 2
    plain_rounds = 0
    for _ in range(400):
        policy.begin_round(1)
        if policy.copy_drafts([offer(1, 4)]) == [0]:
            plain_rounds += 1
            assert not policy.start_round()  # no head either
    assert 400 * (1 - 2 * GOODPUT_PROBE) < plain_rounds < 400
    drafting_rounds = sum(policy.begin_round(2) or policy.copy_drafts([offer(1, 4), offer(1, 4)]) != [0, 0]
                          for _ in range(400))
    assert 400 * (1 - 2 * GOODPUT_PROBE) < drafting_rounds < 400
    model_only = CostAware(BATCH_COSTS, 4, TRUSTED)
    for p in (policy, model_only):  # nothing measured at batch 8: the cost model decides
        p.begin_round(8)
    assert policy.copy_drafts([offer(1, 4)] * 4) == model_only.copy_drafts([offer(1, 4)] * 4)
