"""Names of a run's Redis keys: everything lives under `dvi:{run_id}:` so runs can share a server."""
from __future__ import annotations

import re

GROUP = "learners"  # the one consumer group reading transitions


class RunKeys:
    def __init__(self, run_id: str):
        if not re.fullmatch(r"[\w.:-]+", run_id):
            raise ValueError(f"run_id {run_id!r}: use letters, digits and . _ - : only")
        self.prefix = f"dvi:{run_id}:"
        self.transitions = self.prefix + "transitions"
        self.deadletter = self.prefix + "deadletter"
        self.served = self.prefix + "served"  # stream of served responses as token ids: the actors' traffic memory
        self.stats = self.prefix + "stats"  # hash of run-wide counters: written, consumed, dropped_*, ...
        self.weights_latest = self.prefix + "weights:latest"
        self.weights_index = self.prefix + "weights:index"  # sorted set of published versions, for pruning
        self.learner_stop = self.prefix + "learner:stop"  # set: every learner rank stops at its next step
        self.learner_status = self.prefix + "learner:status"  # hash: what the learner is doing (set-up, held-out)

    def weights(self, version: int) -> str:
        return f"{self.prefix}weights:{version}"
