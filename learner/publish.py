"""Versioned head weights as the learner publishes them.

A blob holds the head's trainable parameters plus `vocab_ids` (its draft vocabulary, when reduced),
and its meta holds the head config: that is all a fresh DrafterHead on the same base model needs
(`selfspec.drafter.head_from_weights`), so an actor that joins late builds exactly the learner's head
from whichever version is current (versions are pruned, so the vocabulary travels in every one).
Each version also goes to disk (`heads/vNNNN`, save_head format). Its held-out MAL goes to the hash
`dvi:{run_id}:learner:heldout_mal` (version -> MAL), kept for the whole run, and to versions.jsonl.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import redis

from buffer.keys import RunKeys
from buffer.weights import WeightStore
from selfspec.drafter import DrafterHead, head_arrays, save_head


def head_dir(heads_dir: Path, version: int) -> Path:
    """Where a published version is saved (`selfspec.drafter.save_head` format): heads/v0007."""
    return Path(heads_dir) / f"v{version:04d}"


def heldout_scores(client: redis.Redis, run_id: str) -> dict[int, float]:
    """version -> held-out MAL of every version the run's learner scored."""
    return {int(v): float(m) for v, m in client.hgetall(RunKeys(run_id).heldout_mal).items()}


class Publisher:
    """Rank 0's side of the weight store: versions only increase, each one is scored and recorded."""

    def __init__(self, client: redis.Redis, run_id: str, base_model: str, keep_last: int, out_dir: Path,
                 save_heads: bool = True):
        self.client, self.run_id, self.base_model = client, run_id, base_model
        self.store = WeightStore(client, run_id, keep_last=keep_last)
        self.log_path = Path(out_dir) / "versions.jsonl"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Redis keeps the last few versions for the actors; disk keeps every one, for eval and drift studies
        self.heads_dir = Path(out_dir) / "heads" if save_heads else None

    def publish(self, head: DrafterHead, version: int, step: int) -> dict:
        """Publish `head` as `version`; returns {version, step, bytes, latency_ms}."""
        start = time.perf_counter()
        meta = {"base_model": self.base_model, "head": head.config.model_dump(), "exit_layer": head.exit_layer,
                "step": step,
                "run_id": self.run_id, "published_at": time.time()}
        size = self.store.publish(version, head_arrays(head), meta)
        if self.heads_dir is not None:
            save_head(head, head_dir(self.heads_dir, version), {k: meta[k] for k in ("base_model", "step", "run_id")}
                      | {"version": version})
        return {"version": version, "step": step, "bytes": size,
                "latency_ms": (time.perf_counter() - start) * 1e3, "published_at": meta["published_at"]}

    def record(self, entry: dict) -> None:
        """After scoring: the MAL into the run's hash, the whole entry into versions.jsonl."""
        if entry.get("heldout_mal") is not None:
            self.client.hset(RunKeys(self.run_id).heldout_mal, entry["version"], entry["heldout_mal"])
        with self.log_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
