"""The traffic memory's suffix index (selfspec.suffix_index) proposes what a brute-force search of its live
sequences proposes: the longest suffix match, the continuation most of its occurrences share; bounded by
sequences and tokens, oldest out first."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from selfspec.proposal import MEMORY, Proposal
from selfspec.suffix_index import SuffixIndexConfig, SuffixIndex

ALL = 10**9  # max_candidates that walks every occurrence: what the brute force does


def brute_force(sequences: list[list[int]], text: list[int], max_tokens: int, config: SuffixIndexConfig) -> Proposal:
    """Every position of every sequence (but its end), its match length with the text's suffix; the longest ones walked
    forward, a token at a time, the most common next token (ties: the most recently stored) while its share
    is at least min_share."""
    tail = text[-config.max_match:]
    found = []  # (match, order, sequence, position): order grows with storage
    for s, seq in enumerate(sequences):
        for p in range(1, len(seq)):  # a position with a token after it: the end continues nothing
            n = 0
            while n < len(tail) and p - 1 - n >= 0 and seq[p - 1 - n] == tail[-1 - n]:
                n += 1
            found.append((n, s * 10**6 + p, s, p))
    longest = max((f[0] for f in found), default=0)
    if longest < max(1, config.min_match):
        return Proposal([], 0, MEMORY)
    walk = [(order, s, p) for n, order, s, p in found if n == longest]
    drafts = []
    while walk and len(drafts) < max_tokens:
        nexts = [(order, sequences[s][p] if p < len(sequences[s]) else None) for order, s, p in walk]
        counts = Counter(t for _, t in nexts)
        best = max(counts.values())
        token = max((o, t) for o, t in nexts if counts[t] == best)[1]
        if token is None or best < config.min_share * len(walk):
            break
        drafts.append(token)
        walk = [(order, s, p + 1) for (order, s, p), (_, t) in zip(walk, nexts) if t == token]
    return Proposal(drafts, longest, MEMORY)


@pytest.mark.parametrize("seed", range(6))
def test_proposals_match_a_brute_force_search(seed):
    """Random sequences over a small vocabulary (many repeats, matches of every length), texts that are
    pieces of stored sequences or random; every proposal equals the brute force's."""
    rng = np.random.default_rng(seed)
    config = SuffixIndexConfig(max_candidates=ALL, min_share=float(rng.choice([0.0, 0.3, 0.6])), min_match=int(rng.integers(1, 4)))
    index, stored = SuffixIndex(config), []
    for _ in range(12):
        seq = rng.integers(0, 6, int(rng.integers(1, 40))).tolist()
        index.insert(seq)
        stored.append(seq)
        for _ in range(20):
            if rng.random() < 0.7:
                src = stored[int(rng.integers(len(stored)))]
                end = int(rng.integers(1, len(src) + 1))
                text = src[int(rng.integers(0, end)):end]
            else:
                text = rng.integers(0, 6, int(rng.integers(1, 20))).tolist()
            want = brute_force(stored, text, 5, config)
            assert index.propose(text, 5) == want, (text, stored)
    assert len(index) == 12 and index.live_tokens == sum(map(len, stored))


def test_the_oldest_go_first_within_the_bounds():
    """At most max_sequences sequences and max_tokens tokens: the oldest are evicted, never proposed
    from again, and after the compaction that follows, proposals are the brute force's over the live ones."""
    config = SuffixIndexConfig(max_sequences=3, max_tokens=40, max_candidates=ALL, min_match=1)
    index, stored = SuffixIndex(config), []
    rng = np.random.default_rng(7)
    for i in range(30):
        seq = [100 + i, *rng.integers(0, 5, int(rng.integers(3, 15))).tolist()]
        index.insert(seq)
        stored.append(seq)
        live = stored[-len(index):]
        assert len(index) <= 3 and index.live_tokens == sum(map(len, live)) <= 40
        for old in stored[:-len(index)]:  # an evicted sequence's marker token matches nothing now
            assert index.propose([old[0]], 3).tokens == []
        for text in ([live[0][0]], live[-1][:3], rng.integers(0, 5, 4).tolist()):
            assert index.propose(text, 4) == brute_force(live, text, 4, config)
    index.insert(list(range(500)))  # longer than max_tokens: its first 40 kept, alone
    assert len(index) == 1 and index.propose([0, 1, 2], 3).tokens == [3, 4, 5]
    assert index.propose([38], 3).tokens == [39]  # its 40th token ends it: no continuation beyond


def test_empty_inputs_propose_nothing():
    index = SuffixIndex()
    assert index.propose([1, 2, 3], 4) == Proposal([], 0, MEMORY)
    index.insert([])
    index.insert([1, 2, 3, 4])
    assert len(index) == 1
    assert index.propose([2, 3], 0).tokens == [] and index.propose([], 4).tokens == []
    assert index.propose([2, 3], 4) == Proposal([4], 2, MEMORY)
    assert index.propose([9, 3], 4).tokens == []  # a 1-token match is below the default min_match 2
