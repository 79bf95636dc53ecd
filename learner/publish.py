"""Versioned head weights as the learner publishes them.

A blob holds the head's trainable parameters plus `vocab_ids` (its draft vocabulary, when reduced),
and its meta holds the head config: that is all a fresh DrafterHead on the same base model needs
(`selfspec.drafter.head_from_weights`), so an actor that joins late builds exactly the learner's head
from whichever version is current (versions are pruned, so the vocabulary travels in every one).
Each version also goes to disk, and its held-out MAL to versions.jsonl.

Where the published heads go under the learner's out_dir is named here only, and read back through
it (`dvi run`, `dvi eval --run`): heads/vNNNN (`head_dir`, `published_heads`), each
selfspec.head_format.write_head's files.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import redis

from buffer.weights import WeightStore
from selfspec.head_format import HEAD_META, write_head

HEADS = "heads"  # out_dir/heads/vNNNN


def head_dir(out_dir: str | Path, version: int) -> Path:
    """Where a published version is saved: heads/v0007."""
    return Path(out_dir) / HEADS / f"v{version:04d}"


def published_heads(out_dir: str | Path) -> dict[int, Path]:
    """version -> head_dir of every version saved under out_dir, in order (only those with head.json,
    written last, so a version being written is not listed yet)."""
    found = {}
    for d in (Path(out_dir) / HEADS).glob("v*"):
        if re.fullmatch(r"v\d+", d.name) and (d / HEAD_META).is_file():
            found[int(d.name[1:])] = d
    return dict(sorted(found.items()))


class Publisher:
    """Rank 0's side of the weight store: versions only increase, each one is scored and recorded."""

    def __init__(self, client: redis.Redis, run_id: str, base_model: str, keep_last: int, out_dir: Path,
                 save_heads: bool = True):
        self.client, self.run_id, self.base_model = client, run_id, base_model
        self.store = WeightStore(client, run_id, keep_last=keep_last)
        self.out_dir, self.save_heads = Path(out_dir), save_heads
        self.log_path = Path(out_dir) / "versions.jsonl"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

    def publish(self, arrays: dict[str, np.ndarray], meta: dict, version: int, step: int) -> dict:
        """Publish a head's weights (selfspec.drafter.head_weights) as `version`; returns {version, step,
        bytes, latency_ms}."""
        start = time.perf_counter()
        meta = meta | {"base_model": self.base_model, "step": step, "run_id": self.run_id, "published_at": time.time()}
        size = self.store.publish(version, arrays, meta)
        # Redis keeps the last few versions for the actors; disk keeps every one, for eval and drift studies
        if self.save_heads:
            write_head(head_dir(self.out_dir, version), arrays,
                       {k: v for k, v in meta.items() if k != "published_at"} | {"version": version})
        return {"version": version, "step": step, "bytes": size,
                "latency_ms": (time.perf_counter() - start) * 1e3, "published_at": meta["published_at"]}

    def record(self, entry: dict) -> None:
        """After scoring: the whole entry (with its held-out MAL) into versions.jsonl."""
        with self.log_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
