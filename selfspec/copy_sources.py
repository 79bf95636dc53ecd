"""Where a sequence's copied drafts come from: its own text (n-gram suffix matches, selfspec.ngram) and the
traffic memory of what was served before (selfspec.suffix_index). The decoder asks for each sequence's
proposals every round; the length policy chooses among them."""
from __future__ import annotations

from dataclasses import dataclass

from selfspec.ngram import MAX_NGRAM, NgramIndex
from selfspec.proposal import Proposal
from selfspec.suffix_index import SuffixIndex


@dataclass(frozen=True)
class CopySources:
    ngram: int = 0  # shortest suffix match of the request's own text to copy from; 0: its own text is not copied
    memory: SuffixIndex | None = None  # its owner inserts what was served, between rounds

    def __post_init__(self):
        if not 0 <= self.ngram <= MAX_NGRAM:
            raise ValueError(f"ngram (shortest suffix match to copy drafts from, 0 = off) must "
                             f"be in [0, {MAX_NGRAM}], got {self.ngram}")

    @property
    def on(self) -> bool:
        return bool(self.ngram) or self.memory is not None

    def text_index(self, tokens: list[int]) -> NgramIndex | None:
        """A new sequence's index of its committed tokens; the memory matches the text's suffix too."""
        return NgramIndex(tokens) if self.on else None

    def propose(self, text: NgramIndex | None, room: int) -> list[Proposal]:
        """What each source offers to copy after the text, at most `room` tokens each."""
        if text is None or room <= 0:
            return []
        found = [text.propose(room, self.ngram) if self.ngram else None,
                 self.memory.propose(text.tokens, room) if self.memory is not None else None]
        return [p for p in found if p is not None and p.tokens]
