"""N-gram proposals match a brute-force scan, and the simulated rounds are the ones worked out by hand."""
from types import SimpleNamespace

import numpy as np
import pytest
from tiny_model import tiny_llama

from selfspec.drafter import DrafterHead, HeadConfig
from selfspec.greedy_paths import annotate_path, simulate_rounds
from selfspec.ngram import NgramIndex, Round, head_predictions, ngram_rule, simulate_ngram_rounds, switch_rule
from selfspec.proposal import Proposal
from selfspec.split import SplitModel


def brute_force(seq, max_tokens, min_ngram, max_ngram) -> Proposal:
    for n in range(min(max_ngram, len(seq) - 1), min_ngram - 1, -1):
        for i in range(len(seq) - n - 1, -1, -1):  # the latest occurrence that has a follower
            if seq[i:i + n] == seq[-n:]:
                return Proposal(seq[i + n:i + n + max_tokens], n)
    return Proposal([], 0)


def test_longest_match_wins():
    # (2, 3) occurred followed by 9; only the shorter (3,) occurred later, followed by 7
    assert NgramIndex([1, 2, 3, 9, 5, 3, 7, 2, 3]).propose(2) == Proposal([9, 5], 2)
    assert NgramIndex([1, 2, 3, 9, 5, 3, 7, 2, 3]).propose(2, max_ngram=1) == Proposal([7, 2], 1)


def test_most_recent_occurrence_wins_and_may_run_into_the_suffix():
    index = NgramIndex([1, 5, 1, 6, 1])
    assert index.propose(1) == Proposal([6], 1)
    assert index.propose(5) == Proposal([6, 1], 1)  # only what followed, up to the end of the sequence
    assert index.propose(5, min_ngram=2) == Proposal([], 0)


def test_no_match_is_empty():
    assert NgramIndex().propose(4) == Proposal([], 0)
    assert NgramIndex([7]).propose(4) == Proposal([], 0)
    assert NgramIndex([1, 2, 3]).propose(4) == Proposal([], 0)  # the suffix never matches itself


def test_max_tokens_respected():
    index = NgramIndex([1, 2, 3, 4, 5, 1])
    assert index.propose(2) == Proposal([2, 3], 1)
    assert index.propose(0).tokens == []
    assert index.propose(10) == Proposal([2, 3, 4, 5, 1], 1)


def test_max_ngram_beyond_the_index_is_an_error():
    with pytest.raises(ValueError):
        NgramIndex([1, 2], max_ngram=2).propose(4, max_ngram=3)


def test_incremental_extend_equals_from_scratch_and_brute_force():
    rng = np.random.default_rng(0)
    seq = rng.integers(0, 4, 120).tolist()  # a small alphabet: many matches of every length
    index, cut = NgramIndex(max_ngram=5), 0
    while cut < len(seq):
        step = int(rng.integers(1, 6))
        index.extend(seq[cut:cut + step])
        cut = min(cut + step, len(seq))
        scratch = NgramIndex(seq[:cut], max_ngram=5)
        for min_ngram, max_ngram in ((1, 5), (2, 3), (3, 5), (1, 1)):
            expected = brute_force(seq[:cut], 6, min_ngram, max_ngram)
            assert index.propose(6, min_ngram, max_ngram) == scratch.propose(6, min_ngram, max_ngram) == expected


# Prompt | output. The first output token (index 5) comes from prefill; positions 5..12 draft.
#            0  1  2  3  4    5  6  7  8  9 10 11 12 13
TOKENS = [7, 1, 2, 3, 8,   1, 2, 3, 9, 1, 2, 3, 9, 4]
PATH = SimpleNamespace(tokens=np.array(TOKENS), prompt_len=5)
HEAD = np.array(TOKENS[6:])  # the head's draft at position 5 + i predicts TOKENS[6 + i] ...
HEAD[0] = 0  # ... right everywhere but at position 5
CONF = np.full(len(HEAD), 0.5)


def test_ngram_rounds_by_hand():
    # Round 1, pending 1 at 5: (1,) last seen at 1 -> [2, 3, 8, 1], the path has [2, 3, 9, 1]: 2 accepted.
    # Round 2, pending 9 at 8: never seen before, no drafts. Round 3, pending 1 at 9, room for 3 drafts:
    # (1,) last seen at 5 -> [2, 3, 9], all accepted, and the bonus token 4 ends the path.
    assert simulate_ngram_rounds(PATH, 4, ngram_rule()) == [Round(4, 2), Round(0, 0), Round(3, 3)]
    # Only 2-gram matches draft: (1, 2) ending at 6 -> [3, 8, 1, 2] (1 accepted), ending at 10 -> [3, 9].
    assert simulate_ngram_rounds(PATH, 4, ngram_rule(min_ngram=2)) == [
        Round(0, 0), Round(4, 1), Round(0, 0), Round(0, 0), Round(2, 2)]


def head_only(prop, head, conf):
    return list(head)


def test_head_and_switch_rounds_by_hand():
    # The head misses its first draft, then drafts 1..4 from position 6 and the last one from 11.
    assert simulate_ngram_rounds(PATH, 4, head_only, HEAD, CONF) == [Round(4, 0), Round(4, 4), Round(1, 1)]
    # The n-gram's round 1 as above, then the head where the n-gram has nothing (position 8): 4 accepted.
    assert simulate_ngram_rounds(PATH, 4, switch_rule(1), HEAD, CONF) == [Round(4, 2), Round(4, 4)]


def test_head_rule_replays_simulate_rounds():
    model = tiny_llama(seed=4)
    head = DrafterHead(SplitModel(model, 2), HeadConfig(adapter_hidden=16, lora_rank=2))
    tokens = np.random.default_rng(1).integers(0, 256, 40).tolist()
    path = annotate_path(model, tokens, 6, 2, topk=8)
    drafts, conf = head_predictions(path, head)
    for gamma in (1, 3, 4):
        rounds = simulate_ngram_rounds(path, gamma, head_only, drafts, conf)
        assert [r.accepted for r in rounds] == simulate_rounds(path, head, gamma)[0]
