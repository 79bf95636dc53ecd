"""What a request asks of a decoder (DecodeOptions) and what it gets back (DecodeResult, a RoundStats per
round): the types selfspec.engine, selfspec.batching and their callers share."""
from __future__ import annotations

from dataclasses import dataclass, field

from selfspec.acceptance import mean_accepted_length


@dataclass
class DecodeOptions:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    seed: int | None = None
    eos_ids: set[int] | None = None  # None: the model's own
    request_id: str | None = None
    workload: str = ""  # tag carried by the request's transitions


@dataclass
class RoundStats:
    drafted: int
    accepted: int
    t_draft: float  # the round's proposing drafts (whole batch): n-gram lookup, head calls, drafts' trunk passes
    t_verify: float  # the round's pending tokens' trunk pass, verification and acceptance (whole batch)
    batch: int = 1  # sequences in the round
    kind: str = "none"  # what drafted: "copied" (own text), "remembered" (traffic memory), "drafted" (head)


@dataclass
class DecodeResult:
    tokens: list[int]
    rounds: list[RoundStats] = field(default_factory=list)
    stop_reason: str = "length"  # "eos", "length", or "stop" (the caller ended it: a stop sequence)
    t_prefill: float = 0.0
    t_total: float = 0.0

    @property
    def mean_accepted_length(self) -> float:
        return mean_accepted_length(r.accepted for r in self.rounds)
