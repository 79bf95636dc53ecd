"""The cost-aware policy drafts only what pays: nothing for a useless head, long drafts for a good one,
and never a round length whose verification shape is too slow."""
from selfspec.length_policy import Calibration, ConfidenceThreshold, CostAware
from selfspec.pass_costs import PassCosts

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
            (n,) = policy.copy_drafts([(match, 4)])
            proposal = [7, 8, 9, 10]
            emitted = proposal[:n + 1] if right else [99]  # right: the model emits the copy anyway
            policy.update_ngram(match, proposal, emitted)
    assert policy.copy_drafts([(1, 4)]) == [0]
    assert policy.ngram_acceptance(1) < 0.05
    assert policy.copy_drafts([(4, 4)]) == [4] and policy.copy_drafts([(4, 2)]) == [2]
    assert policy.ngram_acceptance(4) > 0.9
    assert ConfidenceThreshold(4).copy_drafts([(1, 3)]) == [3]  # the other policies verify every copy offered
