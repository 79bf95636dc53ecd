"""Versioned drafter-head weights: the learner publishes, actors pull when a newer version exists.

`weights:{version}` holds the encoded blob and `weights:latest` the version number; both are set in
one MULTI so a reader never sees a version without its blob. Actors poll `latest_version()` (one
GET) and fetch only when it moved. A blob that does not fit the actor's head (`expected`, a
selfspec.head_format.HeadSpec: the one fit rule) is refused with WeightsRefused and counted; the actor
keeps its current head.
"""
from __future__ import annotations

from typing import NoReturn

import numpy as np
import redis

from buffer.codec import CodecError, decode_weights, encode_weights
from buffer.keys import RunKeys
from selfspec.head_format import HeadSpec


class WeightsRefused(ValueError):
    """A published blob that must not be loaded (corrupt, or not the head this actor runs)."""

    def __init__(self, version: int, problem: str):
        super().__init__(version, problem)  # as its args: it pickles (through Ray) like any exception
        self.version, self.problem = version, problem

    def __str__(self) -> str:
        return f"weights v{self.version} refused: {self.problem}"


class WeightStore:
    def __init__(self, client: redis.Redis, run_id: str, *, expected: HeadSpec | None = None, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError("weights.keep_last must be at least 1")
        self.client, self.keys = client, RunKeys(run_id)
        self.expected = expected
        self.keep_last = keep_last
        self.refused = 0
        self._last_refused: int | None = None  # do not fetch (and count) the same bad version every poll

    def publish(self, version: int, arrays: dict[str, np.ndarray], meta: dict) -> int:
        """Write the blob and move `latest` to it atomically; returns the blob size in bytes."""
        problem = self.expected.problem(arrays, meta) if self.expected else None
        if problem:
            raise WeightsRefused(version, problem)
        latest = self.latest_version()
        if latest is not None and version <= latest:
            raise ValueError(f"weights v{version} is not newer than the published v{latest}")
        blob = encode_weights(version, arrays, meta)
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.weights(version), blob)
        pipe.set(self.keys.weights_latest, version)
        pipe.zadd(self.keys.weights_index, {str(version): version})
        pipe.execute()
        self._prune()
        return len(blob)

    def latest_version(self) -> int | None:
        value = self.client.get(self.keys.weights_latest)
        return None if value is None else int(value)

    def pull_if_newer(self, current: int | None) -> tuple[int, dict[str, np.ndarray], dict] | None:
        """None if nothing newer than `current` is published, else (version, arrays, meta), validated."""
        for _ in range(3):  # the blob can be pruned between the two GETs when versions come fast
            latest = self.latest_version()
            if latest is None or (current is not None and latest <= current) or latest == self._last_refused:
                return None
            blob = self.client.get(self.keys.weights(latest))
            if blob is not None:
                return self._accept(latest, blob)
        self._refuse(latest, "its blob is missing")

    def _accept(self, latest: int, blob: bytes) -> tuple[int, dict[str, np.ndarray], dict]:
        try:
            version, arrays, meta = decode_weights(blob)
        except CodecError as err:
            self._refuse(latest, str(err))
        problem = (f"its blob holds version {version}" if version != latest
                   else self.expected.problem(arrays, meta) if self.expected else None)
        if problem:
            self._refuse(latest, problem)
        return version, arrays, meta

    def _refuse(self, version: int, problem: str) -> NoReturn:
        self.refused += 1
        self._last_refused = version
        raise WeightsRefused(version, problem)

    def _prune(self) -> None:
        old = self.client.zrange(self.keys.weights_index, 0, -self.keep_last - 1)
        if old:
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(*(self.keys.weights(int(v)) for v in old))
            pipe.zrem(self.keys.weights_index, *old)
            pipe.execute()
