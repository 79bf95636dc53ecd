"""A copy proposal: what a source offers to copy after the current text, and the match it rests on.

Its own module, free of torch, so that the sources' settings (selfspec.suffix_index) load in configs and
`dvi --help` without it."""
from __future__ import annotations

from dataclasses import dataclass

TEXT = "text"  # copied from the request's own text (selfspec.ngram)
MEMORY = "memory"  # copied from the traffic memory of what was served before (selfspec.suffix_index)


@dataclass(frozen=True)
class Proposal:
    """Copied drafts: what followed the longest earlier occurrence of the text's suffix."""
    tokens: list[int]
    ngram: int  # length of the matched suffix, 0 when nothing matched
    source: str = TEXT  # where from: TEXT or MEMORY
