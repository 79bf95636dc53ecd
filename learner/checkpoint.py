"""Checkpoints that agree with the stream: what is acknowledged is exactly what a checkpoint holds.

The learner acknowledges trained batches only right after a checkpoint that contains their training
(a commit). Each rank writes a sidecar `learner_rank{r}.json` into the tag directory before DeepSpeed
saves (DeepSpeed writes `latest` last), holding its train state, counters, de-duplication window and
the commit it is about to acknowledge. A crash can then leave three states, and resume handles each:

- before `latest` moved: the previous checkpoint is loaded; everything read since is still pending
  under this rank's consumer name and is read again (`TransitionReader.read_pending`) and trained once;
- after `latest` moved, before the acknowledgement: the commit's entries are still pending although
  the checkpoint holds their training; `recover_commit` acknowledges them without training;
- after the acknowledgement: nothing to do.

So no transition is trained twice in the lineage that survives and none is lost. Versions published
after the loaded checkpoint stay used: resume numbers on from the weight store's latest.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from buffer.stream import ReadBatch, TransitionReader


def merge(batches: list[ReadBatch]) -> ReadBatch:
    out = ReadBatch()
    for b in batches:
        out.transitions += b.transitions
        out.entry_ids += b.entry_ids
        out.deadletters += b.deadletters
        out.stale += b.stale
        out.duplicates += b.duplicates
    return out


def commit_record(batch: ReadBatch) -> dict:
    return {"entries": [e.decode() if isinstance(e, bytes) else e for e in batch.entry_ids],
            "trained_ids": [t.transition_id for t in batch.transitions], "stale": batch.stale,
            "duplicates": batch.duplicates, "deadletter": batch.deadlettered}


class Checkpoints:
    def __init__(self, root: str | Path, rank: int, world_size: int):
        self.root, self.rank, self.world_size = Path(root), rank, world_size

    def latest_tag(self) -> str | None:
        latest = self.root / "latest"
        if not latest.is_file():
            return None
        return latest.read_text().strip() or None

    def save(self, engine, tag: str, client_state: dict, sidecar: dict) -> None:
        folder = self.root / tag
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / f"learner_rank{self.rank}.json", {**sidecar, "rank": self.rank,
                                                               "world_size": self.world_size})
        # Frozen parameters (the output projection's rows) are rebuilt from the model and the saved vocabulary.
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, exclude_frozen_parameters=True)

    def load(self, engine) -> tuple[str, dict]:
        """Load the latest checkpoint into the engine; returns (tag, this rank's sidecar)."""
        tag = self.latest_tag()
        if tag is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.root} (no `latest` file)")
        path = self.root / tag / f"learner_rank{self.rank}.json"
        if not path.is_file():
            raise ValueError(f"--resume: checkpoint {self.root / tag} has no state for rank {self.rank}: "
                             f"was it written by a different number of ranks?")
        sidecar = json.loads(path.read_text())
        if sidecar["world_size"] != self.world_size:
            raise ValueError(f"--resume: checkpoint {self.root / tag} was written by {sidecar['world_size']} ranks, "
                             f"this learner has {self.world_size} (placement.ranks)")
        loaded, _ = engine.load_checkpoint(str(self.root), tag=tag, load_module_strict=False)
        if loaded is None:
            raise ValueError(f"--resume: DeepSpeed could not load {self.root / tag}")
        return tag, sidecar

    def prune(self, keep: str) -> None:
        """Rank 0, after a commit: only the latest tag is ever loaded."""
        if self.rank != 0:
            return
        for folder in self.root.iterdir():
            if folder.is_dir() and folder.name != keep and (folder / f"learner_rank{self.rank}.json").exists():
                shutil.rmtree(folder, ignore_errors=True)

    def save_vocab(self, vocab_ids: np.ndarray | None) -> None:
        """The draft vocabulary is fixed for a run: saved once, read back on resume."""
        self.root.mkdir(parents=True, exist_ok=True)
        if vocab_ids is not None:
            np.save(self.root / "vocab_ids.npy", np.asarray(vocab_ids, np.int64))

    def load_vocab(self) -> np.ndarray | None:
        path = self.root / "vocab_ids.npy"
        return np.load(path, allow_pickle=False) if path.exists() else None


def recover_commit(reader: TransitionReader, commit: dict) -> int:
    """Acknowledge the entries of `commit` (trained in the loaded checkpoint) if the crash came before
    their acknowledgement; returns how many transitions that acknowledged (0 if nothing was left).

    The entries are read again from this consumer's pending list, without a staleness cut (they were
    not stale when trained), and acknowledged with the counts recorded at the commit. Everything else
    pending is released, to be read and trained by the loop."""
    wanted = {e.encode() for e in commit["entries"]}
    trained = set(commit["trained_ids"])
    version, reader.current_version = reader.current_version, None
    found: list[ReadBatch] = []
    try:
        while True:
            b = reader.read_pending(reader.cfg.frame_size)  # one entry at a time: entries are what was acknowledged
            if not b.entry_ids:
                break
            if b.entry_ids[0] in wanted:
                found.append(b)
            else:
                reader.release(b)
    finally:
        reader.current_version = version
    if not found:
        reader.remember(commit["trained_ids"])
        return 0
    got = merge(found)
    if set(got.entry_ids) != wanted:
        missing = sorted(e.decode() for e in wanted - set(got.entry_ids))
        raise RuntimeError(f"resume: entries {missing[:3]} of the last commit were claimed by another consumer "
                           "while this learner was down: cannot resume without training them twice")
    batch = ReadBatch(transitions=[t for t in got.transitions if t.transition_id in trained],
                      entry_ids=got.entry_ids, deadletters=got.deadletters, stale=commit["stale"],
                      duplicates=commit["duplicates"])
    if len(batch.transitions) != len(trained):
        raise RuntimeError(f"resume: the last commit trained {len(trained)} transitions but its pending entries "
                           f"hold {len(batch.transitions)} of them")
    reader.ack(batch)
    return len(batch.transitions)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # never a half-written file under the real name
