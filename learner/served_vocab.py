"""The draft vocabulary, chosen from what the actors serve: the first request waits for nothing.

A reduced draft vocabulary (`head.draft_vocab` ids) must be fixed before the head is built and
version 0 published. Rank 0 reads the first `vocab_tokens` verified positions from the transition
stream without consuming them (XRANGE: the consumer group still delivers every entry for training),
counts the verifier's tokens there and keeps the most frequent; the ids never seen fill the rest in
id order (BPE merge order, roughly frequency). Until then the actors draft with their own starting
head, which the cost-aware policy barely uses anyway.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import redis

from buffer.codec import CodecError, decode_frame, decode_transition
from buffer.keys import RunKeys
from learner.status import LearnerStatus

POLL_S = 0.5


def served_token_counts(client: redis.Redis, run_id: str, vocab_size: int, want: int,
                        stop: Callable[[], bool], status: LearnerStatus) -> np.ndarray:
    """How often each id was the verifier's token in the stream's first `want` positions, read in whole
    entries (fewer when `stop()` turns true first: a run that ends early chooses from what it served)."""
    key = RunKeys(run_id).transitions
    counts = np.zeros(vocab_size, np.int64)
    seen, after = 0, "-"
    status.progress("vocab", "served tokens for the draft vocabulary", 0, want)
    while seen < want and not stop():
        entries = client.xrange(key, min=after, max="+", count=16)
        if not entries:
            time.sleep(POLL_S)
            continue
        for entry_id, fields in entries:
            if seen >= want:
                break
            for tokens in _target_tokens(fields):
                tokens = tokens[(tokens >= 0) & (tokens < vocab_size)]
                np.add.at(counts, tokens, 1)
                seen += len(tokens)
            after = "(" + entry_id.decode()
        status.progress("vocab", "served tokens for the draft vocabulary", min(seen, want), want)
    return counts


def _target_tokens(fields: dict):
    """The verified tokens of each readable transition in an entry (an unreadable one is the reader's
    to dead-letter, later)."""
    try:
        blobs = decode_frame(fields.get(b"frame", b""))
    except CodecError:
        return
    for blob in blobs:
        try:
            yield decode_transition(blob).target_tokens
        except CodecError:
            continue
