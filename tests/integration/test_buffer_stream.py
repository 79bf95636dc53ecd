"""The transition stream against a real redis-server: delivery, dead letters, crashes, backpressure, accounting."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from buffer.codec import encode_transition
from buffer.config import StreamConfig
from buffer.keys import GROUP, RunKeys
from buffer.stream import BackpressureTimeout, TransitionReader, TransitionWriter, run_stats
from buffer.synthetic import random_transition
from selfspec.transitions import ARRAY_FIELDS

REPO = Path(__file__).resolve().parents[2]
KEYS = RunKeys("run")


def _transitions(count: int, d: int = 32, **kw) -> list:
    rng = np.random.default_rng(0)
    return [random_transition(rng, n=4, d=d, k=8, run_id="run", request_id=f"q{i // 10}", round=i % 10, **kw)
            for i in range(count)]


def _drain(reader: TransitionReader, until: int | None = None, timeout_s: float = 30) -> list:
    """Read and ack until `until` transitions were consumed (or, if None, until a read comes back empty)."""
    ids, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with reader.batch(block_ms=100) as batch:
            ids += [t.transition_id for t in batch.transitions]
            if (until is None and not batch.entry_ids) or (until is not None and len(ids) >= until):
                return ids
    raise AssertionError(f"consumed only {len(ids)} transitions in {timeout_s}s")


def test_round_trip_through_redis_and_ack_empties_the_stream(redis_client):
    sent = _transitions(100)
    with TransitionWriter(redis_client, "run", StreamConfig(frame_size=16, write_batch=32)) as writer:
        for t in sent:
            writer.write(t)
    reader = TransitionReader(redis_client, "run", StreamConfig(frame_size=16, batch_size=40))
    got = {}
    while len(got) < len(sent):
        with reader.batch(block_ms=100) as batch:
            assert batch.entry_ids, "stream ran dry before every transition arrived"
            got.update((t.transition_id, t) for t in batch.transitions)
    for t in sent:
        back = got[t.transition_id]
        assert all(getattr(back, f).tobytes() == getattr(t, f).tobytes() for f in ARRAY_FIELDS)
        assert back.scalars() == t.scalars()
    assert redis_client.xlen(KEYS.transitions) == 0  # acknowledged entries are deleted
    assert redis_client.xpending(KEYS.transitions, GROUP)["pending"] == 0
    assert run_stats(redis_client, "run") == {"written": 100, "consumed": 100}


def test_undecodable_entries_go_to_deadletter_and_reading_goes_on(redis_client):
    good = _transitions(40)
    with TransitionWriter(redis_client, "run", StreamConfig(frame_size=8, write_batch=40)) as writer:
        for t in good[:20]:
            writer.write(t)
    extra = _transitions(50)[40:]  # ten more good ones, hand-framed next to damaged blobs
    flipped = bytearray(encode_transition(extra[0]))
    flipped[-5] ^= 0xFF
    mixed = [encode_transition(t) for t in extra[1:6]] + [bytes(flipped), encode_transition(extra[6])[:-100]]
    redis_client.xadd(KEYS.transitions, {"n": len(mixed), "frame": msgpack.packb(mixed)})
    redis_client.xadd(KEYS.transitions, {"n": 3, "frame": b"\xc1 not msgpack"})
    redis_client.xadd(KEYS.transitions, {"n": 3, "frame": msgpack.packb([encode_transition(t) for t in extra[7:]])})
    with TransitionWriter(redis_client, "run", StreamConfig(frame_size=8, write_batch=40)) as writer:
        for t in good[20:]:
            writer.write(t)

    reader = TransitionReader(redis_client, "run", StreamConfig(frame_size=8, batch_size=16))
    ids = _drain(reader)
    assert sorted(ids) == sorted(t.transition_id for t in good + extra[1:6] + extra[7:])
    assert reader.counts["deadletter"] == 5  # one flipped, one truncated, three in the unreadable frame
    letters = redis_client.xrange(KEYS.deadletter)
    reasons = sorted(fields[b"reason"].decode().split(" (")[0].split(":")[0] for _, fields in letters)
    assert reasons == ["checksum mismatch", "frame is not valid msgpack", "truncated or padded"]
    assert letters[0][1][b"blob"] == bytes(flipped)  # the bad bytes are kept for inspection
    assert run_stats(redis_client, "run")["deadletter"] == 5


CHILD_READER = """
import os, sys
from buffer.config import StreamConfig
from buffer.connection import connect
from buffer.stream import TransitionReader
client = connect(sys.argv[1], os.environ.get("DVI_REDIS_PASSWORD"))
reader = TransitionReader(client, "run", StreamConfig(frame_size=16, batch_size=48), consumer="doomed")
batch = reader.read(block_ms=5000)
print(" ".join(t.transition_id for t in batch.transitions), flush=True)
sys.stdin.read()  # hold the batch unacknowledged until killed
"""


def test_batch_of_a_killed_consumer_is_reclaimed_and_every_id_used_once(redis_server, redis_client):
    sent = _transitions(160)
    with TransitionWriter(redis_client, "run", StreamConfig(frame_size=16, write_batch=160)) as writer:
        for t in sent:
            writer.write(t)
    child = subprocess.Popen([sys.executable, "-c", CHILD_READER, redis_server.url], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    held = child.stdout.readline().split()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert len(held) == 48
    assert redis_client.xpending(KEYS.transitions, GROUP)["pending"] == 3  # the dead consumer's three frames

    survivor = TransitionReader(redis_client, "run", StreamConfig(frame_size=16, batch_size=32, claim_idle_ms=200))
    ids = _drain(survivor, until=len(sent))
    assert sorted(ids) == sorted(t.transition_id for t in sent)  # each exactly once, the held ones included
    assert survivor.counts["reclaimed"] == 3
    assert redis_client.xpending(KEYS.transitions, GROUP)["pending"] == 0


def test_fast_producer_stays_under_the_cap_and_every_transition_is_accounted(redis_client):
    cfg = StreamConfig(maxlen=320, frame_size=16, write_batch=64, batch_size=64, backpressure="drop_oldest")
    pool = _transitions(50, d=576)
    writer = TransitionWriter(redis_client, "run", cfg)
    reader = TransitionReader(redis_client, "run", cfg)
    baseline = redis_client.info("memory")["used_memory"]
    held = reader.read(block_ms=0)  # a slow learner holding a batch: its entries must survive trimming
    lengths = []
    for i in range(6000):
        t = pool[i % len(pool)]
        t.request_id, t.round = f"q{i}", 0
        writer.write(t)
        if i % 64 == 63:
            lengths.append(redis_client.xlen(KEYS.transitions))
        if i % 1500 == 1499:  # the learner takes one batch now and then
            with reader.batch(block_ms=0):
                pass
    writer.flush()
    peak = redis_client.info("memory")["used_memory"] - baseline
    reader.ack(held)
    _drain(reader)

    counts, stats = writer.counts, run_stats(redis_client, "run")
    assert counts["written"] == 6000 and counts["dropped_oldest"] > 4000
    assert counts["written"] == reader.counts["consumed"] + counts["dropped_oldest"]
    assert stats["written"] == stats["consumed"] + stats["dropped_oldest"]
    assert reader.counts["consumed"] >= len(held.transitions) + 4 * 64
    # cap: 20 entries of 16, plus the 4 held (never trimmed while pending)
    assert max(lengths) <= writer.cap_entries + len(held.entry_ids)
    entry_bytes = 16 * len(encode_transition(pool[0]))
    assert peak < 2 * (writer.cap_entries + 4) * entry_bytes  # 6000 unbounded would be ~18x more


def test_block_policy_waits_for_the_learner_and_drops_nothing(redis_server, redis_client):
    cfg = StreamConfig(maxlen=64, frame_size=16, write_batch=32, batch_size=32, backpressure="block",
                       block_timeout_s=20)
    consumed, done = [], threading.Event()

    def learner():
        reader = TransitionReader(redis_server.client(), "run", cfg)
        while not done.is_set() or reader.client.xlen(KEYS.transitions):
            with reader.batch(block_ms=50) as batch:
                consumed.extend(t.transition_id for t in batch.transitions)
                time.sleep(0.005)  # slower than the writer

    thread = threading.Thread(target=learner)
    thread.start()
    writer = TransitionWriter(redis_client, "run", cfg)
    lengths = []
    for t in _transitions(640):
        writer.write(t)
        lengths.append(redis_client.xlen(KEYS.transitions))
    writer.flush()
    done.set()
    thread.join(timeout=30)
    assert len(consumed) == 640 and len(set(consumed)) == 640
    assert writer.counts == {"written": 640, "dropped_oldest": 0, "sampled_out": 0}
    assert max(lengths) <= writer.cap_entries and writer.blocked_s > 0


def test_block_policy_times_out_without_a_learner_and_keeps_the_batch(redis_client):
    cfg = StreamConfig(maxlen=32, frame_size=16, write_batch=32, backpressure="block", block_timeout_s=0.2)
    writer = TransitionWriter(redis_client, "run", cfg)
    sent = _transitions(64)
    for t in sent[:32]:
        writer.write(t)  # fills the stream to its cap
    with pytest.raises(BackpressureTimeout, match="is a learner reading it"):
        for t in sent[32:]:
            writer.write(t)
    reader = TransitionReader(redis_client, "run", cfg)
    first = _drain(reader)
    writer.flush()  # the kept batch goes out once there is room
    assert sorted(first + _drain(reader)) == sorted(t.transition_id for t in sent)


def test_stale_and_duplicate_transitions_are_dropped_and_counted(redis_client):
    sent = [t for v in range(10) for t in _transitions(10, head_version=v)]
    for i, t in enumerate(sent):
        t.request_id = f"q{i}"
    with TransitionWriter(redis_client, "run", StreamConfig(frame_size=4, write_batch=20)) as writer:
        for t in sent + sent[-5:]:  # the last five again, as a retried flush would
            writer.write(t)
    reader = TransitionReader(redis_client, "run", StreamConfig(frame_size=4, batch_size=16, max_transition_lag=2))
    reader.current_version = 9
    ids = _drain(reader)
    assert sorted(ids) == sorted(t.transition_id for t in sent if t.head_version >= 7)
    assert reader.counts["stale"] == 70 and reader.counts["duplicates"] == 5
    stats = run_stats(redis_client, "run")
    assert stats["written"] == stats["consumed"] + stats["stale"] + stats["duplicates"] == 105


def test_sampling_keeps_the_requested_fraction_deterministically(redis_client):
    cfg = StreamConfig(sample_rate=0.25, write_batch=1000)
    sent = _transitions(2000)
    first, second = TransitionWriter(redis_client, "a", cfg), TransitionWriter(redis_client, "b", cfg)
    for t in sent:
        first.write(t)
        second.write(t)
    first.flush()
    second.flush()
    assert first.counts["written"] + first.counts["sampled_out"] == 2000
    assert 400 < first.counts["written"] < 600
    assert first.counts == second.counts  # chosen by transition id, not by chance


def test_reader_recovers_when_a_restarted_server_lost_the_stream(redis_client):
    reader = TransitionReader(redis_client, "run", StreamConfig(frame_size=4))
    writer = TransitionWriter(redis_client, "run", StreamConfig(frame_size=4))
    redis_client.flushall()  # what a restart without persistence leaves behind: no stream, no group
    assert reader.read(block_ms=0).entry_ids == []
    for t in _transitions(8):
        writer.write(t)
    writer.flush()
    assert len(_drain(reader)) == 8
