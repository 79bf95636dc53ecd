"""What the actors served, shared: the `dvi:{run}:served` stream that every actor's traffic memory
(selfspec.suffix_index) is built from.

An actor appends each completed response as token ids (little-endian int32 bytes, optionally its prompt
too) with its origin, capped at `maxlen` entries (approximately, as XADD MAXLEN ~ trims). Every actor tails
the stream between requests, as it pulls weights, skipping its own entries (it stored them as it served
them); a new or restarted actor reads it from the start, so it rebuilds the memory the run has. An entry
that does not decode is dead-lettered to `dvi:{run}:deadletter` and counted, never half-stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import redis

from buffer.keys import RunKeys

TOKEN = np.dtype("<i4")


@dataclass(frozen=True)
class Served:
    origin: str  # the actor that served it
    response: list[int]
    prompt: list[int] | None


def encode_tokens(tokens) -> bytes:
    return np.asarray(tokens, dtype=TOKEN).tobytes()


def decode_tokens(blob: bytes) -> list[int]:
    if len(blob) % TOKEN.itemsize:
        raise ValueError(f"token bytes: {len(blob)} is not a multiple of {TOKEN.itemsize}")
    tokens = np.frombuffer(blob, dtype=TOKEN)
    if tokens.size and tokens.min() < 0:
        raise ValueError("token bytes: a negative token id")
    return tokens.tolist()


class ServedLog:
    """One actor's end of the stream: `append` what it served, `read_new` what was served since its last
    read (from the stream's start at first). `origin` names this actor (unique per process): its own
    entries are skipped on reading."""

    def __init__(self, client: redis.Redis, run_id: str, origin: str, maxlen: int = 10_000):
        self.client, self.keys, self.origin, self.maxlen = client, RunKeys(run_id), origin, maxlen
        self.last_id = b"0-0"
        self.counts = {"appended": 0, "read": 0, "corrupt": 0}

    def append(self, response: list[int], prompt: list[int] | None = None) -> None:
        fields = {"origin": self.origin, "response": encode_tokens(response)}
        if prompt is not None:
            fields["prompt"] = encode_tokens(prompt)
        self.client.xadd(self.keys.served, fields, maxlen=self.maxlen, approximate=True)
        self.counts["appended"] += 1

    def read_new(self, page: int = 1_000) -> list[Served]:
        """Others' entries after the last one read, all of them (read `page` entries a call; no blocking)."""
        out = []
        while True:
            replies = self.client.xread({self.keys.served: self.last_id}, count=page)
            entries = [entry for _, stream_entries in replies for entry in stream_entries]
            for entry_id, fields in entries:
                self.last_id = entry_id
                if fields.get(b"origin", b"").decode(errors="replace") != self.origin:
                    self._take(entry_id, fields, out)
            if len(entries) < page:
                break
        self.counts["read"] += len(out)
        return out

    def _take(self, entry_id: bytes, fields: dict, out: list[Served]) -> None:
        try:
            prompt = fields.get(b"prompt")
            out.append(Served(fields[b"origin"].decode(), decode_tokens(fields[b"response"]),
                              decode_tokens(prompt) if prompt is not None else None))
        except (KeyError, ValueError) as err:
            self._dead_letter(entry_id, f"served entry: {err!r}", fields)

    def _dead_letter(self, entry_id: bytes, reason: str, fields: dict) -> None:
        self.counts["corrupt"] += 1
        self.client.xadd(self.keys.deadletter, {"entry": entry_id, "reason": reason, "stream": self.keys.served,
                                                "blob": fields.get(b"response", b""), "transitions": 0},
                         maxlen=self.maxlen,
                         approximate=True)
