"""Traffic memory: drafts copied from what was served before (SuffixDecoding, Oliaro et al., NeurIPS 2025;
vLLM's `suffix` method).

The longest suffix of the current text (up to `max_match` tokens) that occurs in the stored sequences is
matched, and the continuation most of its occurrences share is proposed: from the most recent
`max_candidates` occurrences, each step takes the token most of them go on with, while its share of them
is at least `min_share`, and keeps only the occurrences that agree. The match length and the shares are
the proposal's confidence; the length policy calibrates what a match of each length is worth.

Stored sequences sit end to end in one token list, -1 after each, and every position is indexed under
the hashes of the 1-, 2-, 4- and 8-grams that end just before it (each further length costs memory for
every stored token). A lookup tries the longest first; the most recent `max_candidates` occurrences of the
first that occurs are compared backwards with the text for their true match length (up to max_match, and
hash collisions drop out there), and those with the longest match are walked: at most `max_candidates`
positions per drafted token. At most `max_sequences`
sequences and `max_tokens` tokens are kept, the oldest evicted first; evicted positions are skipped until
the dead outnumber the live, when the list is compacted and the index rebuilt.

vLLM and SGLang wrap arctic-inference's SuffixDecodingCache instead; on PyPI it is a C++ source build (cmake,
ninja, nanobind, a pinned protobuf) with vLLM plugins, more than a CPU laptop's `make install` should carry.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

from selfspec.proposal import MEMORY, Proposal

SEPARATOR = -1  # after each stored sequence: no continuation crosses it
INDEXED = (8, 4, 2, 1)  # n-gram lengths a position is found by, longest first


@dataclass(frozen=True)
class SuffixIndexConfig:
    max_sequences: int = 2_000
    max_tokens: int = 500_000
    max_match: int = 16  # longest suffix compared
    max_candidates: int = 64  # most recent occurrences a proposal walks from
    min_share: float = 0.3  # a drafted token's share of the occurrences still walked, at least
    min_match: int = 2  # shortest suffix match that proposes


class SuffixIndex:
    def __init__(self, config: SuffixIndexConfig = SuffixIndexConfig()):
        self.config = config
        self._tokens: list[int] = []  # stored sequences end to end, SEPARATOR after each
        self._base = 0  # global position of _tokens[0]: positions stay valid across compaction
        self._sequences: deque[tuple[int, int]] = deque()  # (global start, length), oldest first
        self._index: dict[int, list[int]] = {}  # hash of an n-gram -> global positions that follow it
        self.live_tokens = 0

    def __len__(self) -> int:
        return len(self._sequences)

    @property
    def _live_start(self) -> int:
        return self._sequences[0][0] if self._sequences else self._base + len(self._tokens)

    def insert(self, tokens) -> None:
        """Store a sequence (its first max_tokens tokens), evicting the oldest ones beyond the bounds."""
        tokens = [int(t) for t in tokens][: self.config.max_tokens]
        if not tokens:
            return
        start = self._base + len(self._tokens)
        self._tokens += tokens
        self._tokens.append(SEPARATOR)
        self._sequences.append((start, len(tokens)))
        self.live_tokens += len(tokens)
        self._index_positions(tokens, start)
        while len(self._sequences) > self.config.max_sequences or self.live_tokens > self.config.max_tokens:
            self.live_tokens -= self._sequences.popleft()[1]
        if len(self._tokens) > 2 * (self.live_tokens + len(self._sequences)):
            self._compact()

    def propose(self, text, max_tokens: int) -> Proposal:
        """Drafts for what follows `text` (its last max_match tokens are all that matter): the common
        continuation of its longest suffix stored at least min_match long, or nothing."""
        if max_tokens <= 0 or not self._sequences:  # an empty memory answers at once
            return Proposal([], 0, MEMORY)
        tail = [int(t) for t in text[-self.config.max_match:]]
        live = self._live_start
        for n in INDEXED:
            if n > len(tail):
                continue
            positions = [p for p in self._index.get(hash(tuple(tail[-n:])), ())[-self.config.max_candidates:]
                         if p >= live]
            matches = [self._match_length(tail, p) for p in positions]
            longest = max(matches, default=0)
            if longest >= n:  # the n-gram occurs (a shorter match is a hash collision): no shorter one is longer
                if longest < self.config.min_match:
                    break
                return Proposal(self._walk([p for p, m in zip(positions, matches) if m == longest], max_tokens),
                                longest, MEMORY)
        return Proposal([], 0, MEMORY)

    def _match_length(self, tail: list[int], position: int) -> int:
        """How many of tail's last tokens the stored tokens just before `position` repeat."""
        tokens, i, n = self._tokens, position - self._base - 1, 0
        while n < len(tail) and i - n >= 0 and tokens[i - n] == tail[-1 - n]:
            n += 1
        return n

    def _walk(self, positions: list[int], max_tokens: int) -> list[int]:
        drafts, tokens, base = [], self._tokens, self._base
        while positions and len(drafts) < max_tokens:
            # the most recent occurrences first: ties go to what was served last
            token, count = Counter(tokens[p - base] for p in reversed(positions)).most_common(1)[0]
            if token == SEPARATOR or count < self.config.min_share * len(positions):
                break
            drafts.append(token)
            positions = [p + 1 for p in positions if tokens[p - base] == token]
        return drafts

    def _index_positions(self, tokens: list[int], start: int) -> None:
        index = self._index
        for i in range(1, len(tokens)):
            for n in INDEXED:
                if n <= i:
                    index.setdefault(hash(tuple(tokens[i - n:i])), []).append(start + i)

    def _compact(self) -> None:
        """Drop the evicted sequences' tokens and rebuild the index over the live ones."""
        live = self._live_start
        self._tokens = self._tokens[live - self._base:]
        self._base = live
        self._index = {}
        for start, length in self._sequences:
            self._index_positions(self._tokens[start - live:start - live + length], start)
