"""An actor's traffic memory: the suffix index its decoder copies drafts from (selfspec.suffix_index),
filled with what this actor served (`local`) and, `shared`, with what every actor of the run served, through
the run's `served` stream (buffer.served).

Request threads report what they served (`served`: queued here, and appended to the stream); the batch
loop stores it between rounds (`refresh`, beside the weight pull), so the index is only ever touched by the
thread that decodes. A new actor reads the whole stream first (`catch_up`): a restarted one gets the run's
memory back. Redis failing never stops serving: the error is counted and the next refresh tries again.
"""
from __future__ import annotations

import time
from collections import deque

import redis

from actors.config import MemoryConfig
from buffer.served import ServedLog
from selfspec.suffix_index import SuffixIndex, SuffixIndexConfig


class TrafficMemory:
    def __init__(self, cfg: MemoryConfig, log: ServedLog | None = None):
        self.cfg, self.log = cfg, log
        self.index = SuffixIndex(SuffixIndexConfig(max_sequences=cfg.max_sequences, max_tokens=cfg.max_tokens,
                                                   min_match=cfg.min_match))
        self._pending: deque[tuple[list[int], list[int]]] = deque()  # (prompt, response) served here, to store
        self.catch_up_s: float | None = None
        self.errors, self.last_problem = 0, None

    def served(self, prompt: list[int], response: list[int]) -> None:
        """A request this actor served (any thread)."""
        self._pending.append((prompt, response))
        if self.log is not None:
            try:
                self.log.append(response, prompt if self.cfg.prompts else None)
            except redis.RedisError as err:
                self._failed(err)

    def catch_up(self) -> None:
        """Store what the run served before this actor started (the batch loop's thread)."""
        start = time.perf_counter()
        self.refresh()
        self.catch_up_s = time.perf_counter() - start

    def refresh(self) -> None:
        """Store what this actor served since, and what the others did (the batch loop's thread)."""
        while self._pending:
            self._store(*self._pending.popleft())
        if self.log is not None:
            try:
                for entry in self.log.read_new():
                    self._store(entry.prompt, entry.response)
            except redis.RedisError as err:
                self._failed(err)

    def _store(self, prompt: list[int] | None, response: list[int]) -> None:
        # a prompt goes in with its response: the text that led to a response drafts it
        self.index.insert([*prompt, *response] if self.cfg.prompts and prompt else response)

    def _failed(self, err: Exception) -> None:
        self.errors += 1
        self.last_problem = f"{type(err).__name__}: {err}"

    def metrics(self) -> dict:
        log = self.log.counts if self.log is not None else {}
        return {"memory_sequences": len(self.index), "memory_tokens": self.index.live_tokens,
                "memory_catch_up_s": self.catch_up_s, "memory_errors": self.errors,
                "memory_shared_read": log.get("read", 0), "memory_shared_corrupt": log.get("corrupt", 0),
                "last_memory_problem": self.last_problem}
