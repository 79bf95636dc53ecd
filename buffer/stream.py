"""The transition stream: actors write with TransitionWriter, learner ranks read with TransitionReader.

Accounting is exact. Readers delete what they acknowledge, so the stream holds only entries not yet
consumed. Under `drop_oldest` a writer never uses `MAXLEN ~` (it trims uncounted, and could trim
entries a reader holds): a Lua script deletes the oldest entries no reader has been given yet and
adds their number to `dropped_oldest`, atomically. So once drained, per run:
    written == consumed + dropped_oldest + stale + duplicates + deadletter
with every term kept in the run's `stats` hash (and per object in `.counts`).

An entry {n, frame} carries up to `frame_size` transitions, each its own checksummed blob: one XADD
(and one large socket write) per frame instead of per transition is what lets a Python writer reach
tens of thousands per second. Counts are in transitions, never entries.
"""
from __future__ import annotations

import math
import os
import secrets
import socket
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import redis

from buffer.codec import CodecError, decode_frame, decode_transition, encode_frame, encode_transition
from buffer.config import StreamConfig
from buffer.keys import GROUP, RunKeys
from selfspec.transitions import Transition

_TRIM_UNDELIVERED = """
local excess = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[1])
if excess <= 0 then return 0 end
local last = '0-0'
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  if info['name'] == ARGV[2] then last = info['last-delivered-id'] end
end
local dropped = 0
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', excess)) do
  redis.call('XDEL', KEYS[1], entry[1])
  for i = 1, #entry[2], 2 do
    if entry[2][i] == 'n' then dropped = dropped + tonumber(entry[2][i + 1]) end
  end
end
if dropped > 0 then redis.call('HINCRBY', KEYS[2], 'dropped_oldest', dropped) end
return dropped
"""


class BackpressureTimeout(TimeoutError):
    """`block` policy: the stream stayed full longer than `block_timeout_s`; the unsent batch is kept."""


def ensure_group(client: redis.Redis, keys: RunKeys) -> None:
    try:
        client.xgroup_create(keys.transitions, GROUP, id="0", mkstream=True)
    except redis.ResponseError as err:
        if "BUSYGROUP" not in str(err):
            raise


def run_stats(client: redis.Redis, run_id: str) -> dict[str, int]:
    """Run-wide counters summed over every writer and reader."""
    return {k.decode(): int(v) for k, v in client.hgetall(RunKeys(run_id).stats).items()}


class TransitionWriter:
    def __init__(self, client: redis.Redis, run_id: str, cfg: StreamConfig = StreamConfig()):
        self.client, self.cfg, self.keys = client, cfg, RunKeys(run_id)
        # the cap is enforced in entries: full frames make it maxlen transitions, rounded up to a frame
        self.cap_entries = math.ceil(cfg.maxlen / cfg.frame_size)
        if cfg.backpressure == "block" and math.ceil(cfg.write_batch / cfg.frame_size) > self.cap_entries:
            raise ValueError("stream.maxlen must hold at least one stream.write_batch under `block`")
        self.counts = {"written": 0, "dropped_oldest": 0, "sampled_out": 0}
        self.blocked_s = 0.0
        self._pending: list[bytes] = []
        self._first_pending_at = 0.0
        self._stream_len = 0  # entries, as of the last flush
        self._trim = client.register_script(_TRIM_UNDELIVERED)
        ensure_group(client, self.keys)

    def write(self, t: Transition) -> None:
        # Sampling hashes the id rather than drawing a random number, so a replayed run keeps the same ones.
        if self.cfg.sample_rate < 1 and zlib.crc32(t.transition_id.encode()) >= self.cfg.sample_rate * 2**32:
            self.counts["sampled_out"] += 1
            return
        if not self._pending:
            self._first_pending_at = time.monotonic()
        self._pending.append(encode_transition(t, quantize_hidden=self.cfg.quantize_hidden))
        if (len(self._pending) >= self.cfg.write_batch
                or time.monotonic() - self._first_pending_at >= self.cfg.flush_interval_s):
            self.flush()

    def flush(self) -> None:
        """Send what is buffered. On an error the batch stays buffered; a retry may duplicate, readers de-dup."""
        if not self._pending:
            return
        size = self.cfg.frame_size
        frames = [self._pending[i:i + size] for i in range(0, len(self._pending), size)]
        if self.cfg.backpressure == "block":
            self._wait_for_room(len(frames))
        pipe = self.client.pipeline(transaction=False)
        for frame in frames:
            pipe.xadd(self.keys.transitions, {"n": len(frame), "frame": encode_frame(frame)})
        pipe.hincrby(self.keys.stats, "written", len(self._pending))
        if self.cfg.backpressure == "drop_oldest":
            self._trim(keys=[self.keys.transitions, self.keys.stats], args=[self.cap_entries, GROUP], client=pipe)
        else:
            pipe.xlen(self.keys.transitions)
        last = pipe.execute()[-1]
        self.counts["written"] += len(self._pending)
        self._pending.clear()
        if self.cfg.backpressure == "drop_oldest":
            self.counts["dropped_oldest"] += last
        else:
            self._stream_len = last

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "TransitionWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wait_for_room(self, frames: int) -> None:
        if self._stream_len + frames <= self.cap_entries:
            return
        started = time.monotonic()
        while self._stream_len + frames > self.cap_entries:
            if time.monotonic() - started > self.cfg.block_timeout_s:
                self.blocked_s += time.monotonic() - started
                raise BackpressureTimeout(
                    f"{self.keys.transitions} stayed full ({self._stream_len} entries, cap {self.cap_entries}) for "
                    f"{self.cfg.block_timeout_s:g}s: is a learner reading it?")
            time.sleep(0.01)
            self._stream_len = self.client.xlen(self.keys.transitions)
        self.blocked_s += time.monotonic() - started


@dataclass
class ReadBatch:
    transitions: list[Transition] = field(default_factory=list)
    entry_ids: list[bytes] = field(default_factory=list)
    deadletters: list[dict] = field(default_factory=list)  # {entry, reason, blob, transitions}
    stale: int = 0
    duplicates: int = 0

    @property
    def deadlettered(self) -> int:
        return sum(letter["transitions"] for letter in self.deadletters)


class TransitionReader:
    """Reads batches for one consumer of the `learners` group. Nothing is acknowledged until `ack(batch)`."""

    def __init__(self, client: redis.Redis, run_id: str, cfg: StreamConfig = StreamConfig(),
                 consumer: str | None = None):
        self.client, self.cfg, self.keys = client, cfg, RunKeys(run_id)
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.current_version: int | None = None  # set by the learner; staleness is measured against it
        self.counts = {"consumed": 0, "stale": 0, "duplicates": 0, "deadletter": 0, "reclaimed": 0}
        self._seen: dict[str, None] = {}  # insertion-ordered set of used ids, oldest evicted first
        self._inflight_entries: set[bytes] = set()
        self._inflight_ids: set[str] = set()
        self._claim_cursor = "0-0"
        self._pending_cursor = "0-0"
        ensure_group(client, self.keys)

    def read(self, count: int | None = None, block_ms: int | None = None) -> ReadBatch:
        """Up to `count` transitions: first entries dead consumers left pending, then new ones."""
        want = math.ceil((count or self.cfg.batch_size) / self.cfg.frame_size)
        try:
            entries = self._reclaim(want)
            if len(entries) < want:
                block = self.cfg.read_block_ms if block_ms is None else block_ms
                reply = self.client.xreadgroup(GROUP, self.consumer, {self.keys.transitions: ">"},
                                               count=want - len(entries), block=None if entries or not block else block)
                entries += reply[0][1] if reply else []
        except redis.ResponseError as err:
            if "NOGROUP" not in str(err):
                raise
            ensure_group(self.client, self.keys)  # a server restarted without persistence lost it
            return ReadBatch()
        batch = ReadBatch()
        for entry_id, fields in entries:
            batch.entry_ids.append(entry_id)
            self._take_entry(batch, entry_id, fields)
        self._inflight_entries.update(batch.entry_ids)
        return batch

    def read_pending(self, count: int | None = None) -> ReadBatch:
        """Entries this consumer was given and never acknowledged (its own pending list, oldest first):
        what a learner restarted under the same consumer name read before it died. Without this they
        would come back only after `claim_idle_ms`, to whichever reader claims them. Successive calls
        walk the list; once one comes back empty the next starts again from the oldest."""
        want = math.ceil((count or self.cfg.batch_size) / self.cfg.frame_size)
        batch = ReadBatch()
        while not batch.entry_ids:  # a page of entries this reader already holds is skipped, not an end
            reply = self.client.xreadgroup(GROUP, self.consumer, {self.keys.transitions: self._pending_cursor},
                                           count=want)
            entries = reply[0][1] if reply else []
            if not entries:
                self._pending_cursor = "0-0"
                break
            self._pending_cursor = entries[-1][0]
            for entry_id, fields in entries:
                if entry_id in self._inflight_entries:
                    continue
                batch.entry_ids.append(entry_id)  # acknowledged with the batch, even if deleted meanwhile
                if fields:  # a pending entry deleted from the stream reads as None: nothing left to count
                    self._take_entry(batch, entry_id, fields)
        self._inflight_entries.update(batch.entry_ids)
        return batch

    def seen_ids(self) -> list[str]:
        """The de-duplication window (acknowledged ids, oldest first), for a learner's checkpoint."""
        return list(self._seen)

    def remember(self, ids) -> None:
        """Restore ids into the de-duplication window (from a checkpoint), as if acknowledged here."""
        for tid in ids:
            self._seen[tid] = None
        while len(self._seen) > self.cfg.dedup_window:
            del self._seen[next(iter(self._seen))]

    def ack(self, batch: ReadBatch) -> None:
        """The batch was used: dead letters, acknowledgements and counters commit together (MULTI)."""
        pipe = self.client.pipeline(transaction=True)
        for letter in batch.deadletters:  # capped like the stream: the count in `stats` stays exact
            pipe.xadd(self.keys.deadletter, letter, maxlen=self.cfg.maxlen, approximate=True)
        if batch.entry_ids:
            pipe.xack(self.keys.transitions, GROUP, *batch.entry_ids)
            pipe.xdel(self.keys.transitions, *batch.entry_ids)
        done = {"consumed": len(batch.transitions), "stale": batch.stale, "duplicates": batch.duplicates,
                "deadletter": batch.deadlettered}
        for name, n in done.items():
            if n:
                pipe.hincrby(self.keys.stats, name, n)
        pipe.execute()
        for name, n in done.items():
            self.counts[name] += n
        for t in batch.transitions:
            self._seen[t.transition_id] = None
        while len(self._seen) > self.cfg.dedup_window:
            del self._seen[next(iter(self._seen))]
        self.release(batch)

    def release(self, batch: ReadBatch) -> None:
        """Forget a batch without acknowledging it: after `claim_idle_ms` any reader may reclaim it."""
        self._inflight_entries.difference_update(batch.entry_ids)
        self._inflight_ids.difference_update(t.transition_id for t in batch.transitions)

    @contextmanager
    def batch(self, count: int | None = None, block_ms: int | None = None):
        """`with reader.batch() as b: train(b.transitions)` acknowledges only if the body succeeded."""
        b = self.read(count, block_ms)
        try:
            yield b
        except BaseException:
            self.release(b)
            raise
        self.ack(b)

    def _reclaim(self, want: int) -> list:
        cursor, claimed, *_ = self.client.xautoclaim(
            self.keys.transitions, GROUP, self.consumer, min_idle_time=self.cfg.claim_idle_ms,
            start_id=self._claim_cursor, count=want)
        self._claim_cursor = cursor
        # Redis 6.2 reports a pending entry deleted from the stream as (None, None); our own slow
        # batches come back too once idle, and stay with the batch that holds them.
        claimed = [(eid, fields) for eid, fields in claimed if eid is not None and eid not in self._inflight_entries]
        self.counts["reclaimed"] += len(claimed)
        return claimed

    def _take_entry(self, batch: ReadBatch, entry_id: bytes, fields: dict) -> None:
        declared = fields.get(b"n", b"")
        try:
            blobs = decode_frame(fields.get(b"frame", b""))
        except CodecError as err:
            # Without a readable frame only the declared size says how many transitions were lost.
            lost = int(declared) if declared.isdigit() else 1
            batch.deadletters.append(_letter(entry_id, str(err), fields.get(b"frame", b""), lost))
            return
        for blob in blobs:
            self._take(batch, entry_id, blob)

    def _take(self, batch: ReadBatch, entry_id: bytes, blob: bytes) -> None:
        try:
            t = decode_transition(blob)
        except CodecError as err:
            batch.deadletters.append(_letter(entry_id, str(err), blob, 1))
            return
        tid = t.transition_id
        if tid in self._seen or tid in self._inflight_ids:
            batch.duplicates += 1
        elif (self.cfg.max_transition_lag is not None and self.current_version is not None
              and t.head_version < self.current_version - self.cfg.max_transition_lag):
            batch.stale += 1
        else:
            batch.transitions.append(t)
            self._inflight_ids.add(tid)


def _letter(entry_id: bytes, reason: str, blob: bytes, transitions: int) -> dict:
    return {"entry": entry_id, "reason": reason, "blob": blob, "transitions": transitions}
