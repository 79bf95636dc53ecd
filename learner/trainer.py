"""The learner loop: read transitions from Redis, train the drafter head with DeepSpeed, publish versions.

One rank's loop, the same with one rank or many:

    fill   read this rank's share (batch_size / ranks) through the `learners` consumer group
    sync   one all-reduce of a few flags: step now? stop? (a step needs every rank, data or not)
    step   selfspec.objectives.train_step with the DeepSpeed engine as the optimizer, `reuse` times:
           the exact training step of `dvi online`, gradients averaged over the ranks
    publish  every publish_every_steps steps or publish_every_s seconds (rank 0), then score it; once the
             held-out paths exist, a head scoring below the best published one (beyond publish_gate) is held back
    commit   every checkpoint.every_steps steps or every_s seconds: checkpoint, then acknowledge what it
             holds (learner/checkpoint.py): acknowledgement waits for the checkpoint, never for less

A rank whose share is empty when the others step joins with a zero gradient (as torch DDP's Join does),
so a thin stream never stalls the group; its share of the average is then zero.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import redis
import torch

from buffer.keys import RunKeys
from buffer.stream import ReadBatch, TransitionReader
from buffer.weights import WeightStore
from learner.checkpoint import Checkpoints, commit_record, merge, recover_commit
from learner.config import LearnerConfig, deepspeed_config
from learner.dist import broadcast_ids, device, sync_min, sync_sum
from learner.heldout import HeldoutPaths
from learner.publish import Publisher
from selfspec.drafter import DrafterHead, head_from_weights, head_weights
from selfspec.greedy_paths import mean_accepted_length
from selfspec.model import model_name
from selfspec.objectives import TrainState, train_step
from selfspec.split import SplitModel
from selfspec.transitions import KINDS, Transition

Log = Callable[[dict], None]


@dataclass
class LearnerSetup:
    """What a rank starts from besides its config, Redis client and model."""
    rank: int = 0
    world_size: int = 1
    resume: bool = False
    heldout: HeldoutPaths | None = None  # rank 0 scores every published version on these, once they exist
    vocab_ids: np.ndarray | None = None  # rank 0's draft vocabulary (None: chosen by the head config)
    log: Log | None = None
    record_ids: bool = False  # keep the ids of trained transitions (tests check exactly-once)
POLL_MS = 100  # longest a read blocks: the ranks meet at least this often
COUNTERS = ("steps", "zero_steps", "trained_transitions", "trained_positions", "consumed", "stale", "duplicates",
            "deadletter", "published", "held_back", "commits")


class Learner:
    """One rank. The caller has joined the process group (learner.dist.init_distributed)."""

    def __init__(self, cfg: LearnerConfig, client: redis.Redis, model, setup: LearnerSetup = LearnerSetup()):
        import deepspeed

        rank, world_size, resume, log = setup.rank, setup.world_size, setup.resume, setup.log
        self.cfg, self.client, self.rank, self.world_size = cfg, client, rank, world_size
        self.heldout = setup.heldout
        self._unscored: list[tuple[dict, tuple | None]] = []  # (published entry, its head's weights) awaiting paths
        self._best: float | None = None  # the best held-out MAL of a published version (the gate's bar)
        self.log = log if rank == 0 and log is not None else (lambda record: None)
        self.ckpt = Checkpoints(cfg.checkpoint_dir, rank, world_size)
        if not resume and self.ckpt.latest_tag() is not None:
            raise ValueError(f"checkpoint.dir {cfg.checkpoint_dir} already holds a checkpoint: pass --resume to "
                             "continue it, or choose another checkpoint.dir / out_dir")
        if resume:
            setup = replace(setup, vocab_ids=self.ckpt.load_vocab())
        self.head = self._build_head(model, setup.vocab_ids)
        on_gpu = device().type == "cuda"
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu and torch.cuda.is_bf16_supported())
        params = [p for p in self.head.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=self.head, optimizer=optimizer,
                                               config=deepspeed_config(cfg.deepspeed, bf16))
        self.state = TrainState.create(cfg.schedule, cfg.schedule_config, cfg.loss)
        # A stable consumer name per rank: a restarted rank finds what it had read and not acknowledged.
        self.reader = TransitionReader(client, cfg.run_id, cfg.stream, consumer=f"learner-{rank}")
        self.publisher = Publisher(client, cfg.run_id, model_name(cfg.model), cfg.weights.keep_last,
                                   Path(cfg.out_dir), cfg.save_heads) if rank == 0 else None
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.trained_ids: list[str] | None = [] if setup.record_ids else None
        self.rank_batch = math.ceil(cfg.batch_size / world_size)
        self.min_batch = max(1, math.ceil(cfg.min_fill * self.rank_batch))
        self.held: list[ReadBatch] = []  # read, not trained yet
        self.done: list[ReadBatch] = []  # trained (or nothing to train), acknowledged at the next commit
        self._replaying = True  # first read this consumer's own pending entries (a previous process's)
        self._stop = False
        self.step = 0
        self._last_step_at: float | None = None
        self._last_publish = self._last_commit = time.monotonic()
        self._steps_at_publish = self._steps_at_commit = 0
        if resume:
            self._resume()
        else:
            self._start_fresh()

    # ------------------------------------------------------------------ set-up

    def _build_head(self, model, vocab_ids) -> DrafterHead:
        """Every rank builds the head with rank 0's draft vocabulary (DeepSpeed then broadcasts rank 0's
        parameters, the frozen projection rows included)."""
        torch.manual_seed(self.cfg.seed)
        with fixed_kernels():
            split = self.split = SplitModel(model, self.cfg.exit_layer)
        head = DrafterHead(split, self.cfg.head, vocab_ids) if self.rank == 0 else None
        ids = broadcast_ids(head.vocab_ids if head is not None else None, self.cfg.head.draft_vocab)
        if head is None:
            torch.manual_seed(self.cfg.seed)
            head = DrafterHead(split, self.cfg.head, None if ids is None else ids.numpy())
        return head

    def _start_fresh(self) -> None:
        latest = self._latest_version()
        self.version = 0 if latest is None else latest + 1  # a fresh learner on an old run numbers on
        if self.rank == 0:
            self.ckpt.save_vocab(None if self.head.vocab_ids is None else self.head.vocab_ids.cpu().numpy())
        self._publish(first=True)  # actors get the head (and its vocabulary) before any training

    def _resume(self) -> None:
        tag, side = self.ckpt.load(self.engine)
        self.state.load_state_dict(side["train_state"])
        self.step = side["step"]
        self._best = side.get("best_heldout_mal")  # absent from checkpoints written before the gate
        self._steps_at_publish = self._steps_at_commit = self.step
        self.counters.update(side["counters"])
        latest = self._latest_version()
        # Versions published after this checkpoint (by the process that died) stay used.
        self.version = max(side["version"], -1 if latest is None else latest)
        self.reader.current_version = self.version
        self.reader.remember(side["dedup"])
        acked = recover_commit(self.reader, side["commit"])
        self.log({"step": self.step, "version": self.version, "event": "resume", "checkpoint": tag,
                  "recovered_acks": acked})

    def _latest_version(self) -> int | None:
        latest = WeightStore(self.client, self.cfg.run_id).latest_version()
        torch.distributed.barrier()  # every rank reads it before rank 0 publishes the next
        return latest

    # ------------------------------------------------------------------ the loop

    def run(self, steps: int | None = None) -> dict:
        """Train until `steps` more steps, config max_steps, idle_exit_s, SIGTERM or the stop key; then
        publish what is unpublished and commit. Returns this rank's counters."""
        target = self.step + steps if steps is not None else None
        if self.cfg.max_steps is not None:
            target = min(target or self.cfg.max_steps, self.cfg.max_steps)
        previous = self._catch_sigterm()
        fill_started = last_arrival = time.monotonic()
        try:
            while True:
                arrived = self._fill()
                now = time.monotonic()
                if arrived:
                    last_arrival = now
                held = sum(len(b.transitions) for b in self.held)
                full = held >= self.rank_batch
                waited = now - fill_started >= self.cfg.fill_timeout_s
                idle = (self.cfg.idle_exit_s is not None and now - last_arrival >= self.cfg.idle_exit_s
                        and held < self.min_batch)
                stop = self._stop or (target is not None and self.step >= target) or self._stop_requested()
                publish_due = self.rank == 0 and self._due(self._last_publish, self._steps_at_publish,
                                                           self.cfg.publish_every_s)
                commit_due = self.rank == 0 and self._due(self._last_commit, self._steps_at_commit,
                                                          self.cfg.checkpoint.every_s)
                # one all-reduce(min): "all" flags as they are, "any" flags negated
                all_full, all_waited, all_idle, any_min, any_stop, any_publish, any_commit = sync_min(
                    [full, full or waited, idle, -(held >= self.min_batch), -stop, -publish_due, -commit_due])
                if any_stop < 0 or all_idle > 0:
                    break
                if any_publish < 0:
                    self._publish()
                elif self._unscored:
                    self._score()
                if any_commit < 0:
                    self._commit()
                if all_full > 0 or (any_min < 0 and all_waited > 0):
                    self._train_held()
                    fill_started = time.monotonic()
                    if self.step - self._steps_at_publish >= self.cfg.publish_every_steps:
                        self._publish()
                    if self.step - self._steps_at_commit >= self.cfg.checkpoint.every_steps:
                        self._commit()
                elif full:
                    time.sleep(0.005)  # waiting for the other ranks without blocking on a read
            if self.step > self._steps_at_publish:
                self._publish()
            self._score(wait=True)
            self._commit()
            for b in self.held:  # read but not trained: pending under this consumer, read again next time
                self.reader.release(b)
            self.held = []
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return dict(self.counters)

    def _due(self, since: float, steps_at: int, every_s: float) -> bool:
        return self.step > steps_at and time.monotonic() - since >= every_s

    def _fill(self) -> bool:
        """Read toward this rank's share of a batch; True if transitions arrived."""
        want = self.rank_batch - sum(len(b.transitions) for b in self.held)
        if want <= 0:
            return False
        batch = self.reader.read_pending(want) if self._replaying else None
        if batch is None or not batch.entry_ids:
            self._replaying = False
            batch = self.reader.read(want, block_ms=POLL_MS)
        if not batch.entry_ids:
            return False
        (self.held if batch.transitions else self.done).append(batch)  # only stale/duplicates: ack at the commit
        return bool(batch.transitions)

    def _stop_requested(self) -> bool:
        return self.rank == 0 and bool(self.client.exists(RunKeys(self.cfg.run_id).learner_stop))

    def _catch_sigterm(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def on_sigterm(signum, frame):
            self._stop = True  # finish the step, publish, checkpoint, acknowledge, exit

        return signal.signal(signal.SIGTERM, on_sigterm)

    # ------------------------------------------------------------------ steps

    def _train_held(self) -> None:
        """`reuse` optimizer steps on what this rank holds (a zero gradient if it holds nothing), one
        metrics record per step; the batches then wait for the next commit to be acknowledged."""
        transitions = [t for b in self.held for t in b.transitions]
        positions = sum(t.n for t in transitions)
        lags = [self.version - t.head_version for t in transitions]
        total_t, total_p, lag_sum = sync_sum([len(transitions), positions, sum(lags)])
        (neg_lag_max,) = sync_min([-max(lags, default=0)])
        batch = {"charts/batch_transitions": total_t, "charts/batch_positions": total_p,
                 "charts/transition_lag_mean": lag_sum / max(total_t, 1), "charts/transition_lag_max": -neg_lag_max,
                 **composition(transitions)}
        for _ in range(self.cfg.reuse):
            started = time.perf_counter()
            metrics = (train_step(self.head, self.engine, transitions, self.state, self.cfg.loss) if transitions
                       else self._zero_step())
            self.step += 1
            self.counters["steps"] += 1
            now = time.monotonic()
            train_s = time.perf_counter() - started
            # since the previous step: reading and waiting included, what the stream actually sees
            interval = max(now - self._last_step_at, 1e-9) if self._last_step_at is not None else train_s
            self._last_step_at = now
            self.log({"step": self.step, "version": self.version, **metrics, **batch, "charts/train_s": train_s,
                      "charts/steps_per_s": 1 / interval, "charts/transitions_per_s": total_t / interval,
                      "charts/positions_per_s": total_p / interval})
        self.done += self.held
        self.held = []
        self.counters["trained_transitions"] += len(transitions)
        self.counters["trained_positions"] += positions
        self.counters["zero_steps"] += 0 if transitions else self.cfg.reuse
        if self.trained_ids is not None:
            self.trained_ids += [t.transition_id for t in transitions]

    def _zero_step(self) -> dict:
        """This rank has no data while the others step: a zero gradient keeps the collectives matched."""
        loss = sum((p * 0).sum() for p in self.head.parameters() if p.requires_grad)
        self.engine.backward(loss)
        self.engine.step()
        self.state.schedule.advance()
        return {"charts/zero_step": 1.0}

    # ------------------------------------------------------------------ publish and commit

    def _publish(self, first: bool = False) -> None:
        """The next version (`first`: the current one, at a fresh start): rank 0 publishes and scores
        it, every rank measures staleness against it from now on. Once the held-out paths exist, the
        gate (`publish_gate`) holds back a head that scores worse than the best version published, beyond
        the tolerance: the actors keep serving the better one while this one trains on. Rank 0 decides,
        every rank learns it (the version numbers stay the same on all)."""
        score = None if first or self.rank != 0 else self._candidate_score()
        (ship,) = sync_min([0.0 if self._held_back(score) else 1.0])
        self._last_publish, self._steps_at_publish = time.monotonic(), self.step
        if not ship:
            self.counters["held_back"] += 1
            self.log({"step": self.step, "version": self.version, "charts/held_back_total": self.counters["held_back"]})
            return
        if not first:
            self.version += 1
        if self.rank == 0:
            weights = head_weights(self.head)
            entry = self.publisher.publish(*weights, self.version, self.step)
            self.log({"step": self.step, "version": self.version, "charts/publish_latency_ms": entry["latency_ms"],
                      "charts/publish_mb": entry["bytes"] / 1e6})
            if score is not None:  # the gate scored this head already
                entry["heldout_mal"] = score
            ready = self.heldout is None or self.heldout.ready() is not None
            # scored now, or kept until the held-out paths exist (the head trains on meanwhile)
            self._unscored.append((entry, None if ready and not self._unscored else weights))
            self._score()
        self.reader.current_version = self.version
        self.counters["published"] += 1

    def _candidate_score(self) -> float | None:
        """Rank 0, gate on: the head's held-out MAL as it stands, once the paths exist (the versions
        published before them are scored first, so that the best one is known)."""
        paths = None if self.cfg.publish_gate is None or self.heldout is None else self.heldout.ready()
        if not paths:
            return None
        self._score()
        started = time.perf_counter()
        score = mean_accepted_length(paths, self.head, self.cfg.gamma)
        self.log({"step": self.step, "version": self.version, "charts/candidate_mal": score,
                  "charts/best_published_mal": self._best, "charts/candidate_score_s": time.perf_counter() - started})
        return score

    def _held_back(self, score: float | None) -> bool:
        return score is not None and self._best is not None and score < self._best - self.cfg.publish_gate

    def _score(self, wait: bool = False) -> None:
        """Rank 0: the held-out MAL of every published version not scored yet (by the gate), once the
        held-out paths exist (`wait`: until they do); each is then recorded in order (versions.jsonl)."""
        if not self._unscored:
            return
        paths = None if self.heldout is None else (self.heldout.wait() if wait else self.heldout.ready())
        if self.heldout is not None and paths is None:
            return
        for entry, weights in self._unscored:
            if paths:
                head = self.head if weights is None else head_from_weights(self.split, *weights)
                if entry.get("heldout_mal") is None:
                    entry["heldout_mal"] = mean_accepted_length(paths, head, self.cfg.gamma)
                self._best = max(entry["heldout_mal"], self._best if self._best is not None else -math.inf)
                self.log({"step": entry["step"], "version": entry["version"], "charts/heldout_mal": entry["heldout_mal"]})
            else:
                entry["heldout_mal"] = None
            self.publisher.record(entry)
        self._unscored = []

    def _commit(self) -> None:
        """Checkpoint everything trained so far, then acknowledge the batches it holds. A crash between
        the two leaves exactly what `learner.checkpoint.recover_commit` repairs on resume."""
        if self.step == self._steps_at_commit and not self.done:
            return
        started = time.perf_counter()
        tag, batch = self._checkpoint()
        self.reader.ack(batch)
        self.done = []
        self.ckpt.prune(keep=tag)
        self._last_commit, self._steps_at_commit = time.monotonic(), self.step
        self.log({"step": self.step, "version": self.version, "charts/checkpoint_s": time.perf_counter() - started,
                  "charts/acknowledged": len(batch.transitions), "charts/stale_total": self.counters["stale"],
                  "charts/duplicates_total": self.counters["duplicates"],
                  "charts/deadletter_total": self.counters["deadletter"]})

    def _checkpoint(self):
        """The first half of a commit: a checkpoint whose counters already count the batches about to be
        acknowledged (they hold once the acknowledgement lands, by the loop or by recovery)."""
        batch = merge(self.done)
        self.counters = {**self.counters, "consumed": self.counters["consumed"] + len(batch.transitions),
                         "stale": self.counters["stale"] + batch.stale,
                         "duplicates": self.counters["duplicates"] + batch.duplicates,
                         "deadletter": self.counters["deadletter"] + batch.deadlettered,
                         "commits": self.counters["commits"] + 1}
        tag = f"step{self.step}-c{self.counters['commits']}"  # unique: a tag is never rewritten
        state = {"step": self.step, "version": self.version, "train_state": self.state.state_dict(),
                 "counters": self.counters, "best_heldout_mal": self._best}
        self.ckpt.save(self.engine, tag, state, {**state, "dedup": self.reader.seen_ids(),
                                                 "commit": commit_record(batch)})
        return tag, batch

    def parameters(self) -> dict[str, np.ndarray]:
        """The trainable parameters as numpy (what Ray hands back: arrays, never tensors)."""
        return self.head.trainable_state()


@contextmanager
def fixed_kernels():
    """The split times two matmul kernels for few-row passes when built (minutes on a busy CPU). The
    learner never runs a few-row pass: its batches and held-out paths are hundreds of rows, where the
    plain kernel is the one either way, so it skips the timing (DVI_THIN_GEMM_ROWS=none, unless set)."""
    before = os.environ.get("DVI_THIN_GEMM_ROWS")
    os.environ["DVI_THIN_GEMM_ROWS"] = before if before is not None else "none"
    try:
        yield
    finally:
        if before is None:
            del os.environ["DVI_THIN_GEMM_ROWS"]


def composition(transitions: list[Transition]) -> dict[str, float]:
    """This rank's batch by workload (fraction of transitions) and by kind of row (fraction of
    positions: drafted / copied / plain / distill)."""
    if not transitions:
        return {}
    workloads = Counter(t.workload or "unknown" for t in transitions)
    kinds = Counter(np.concatenate([t.kind for t in transitions]).tolist())
    positions = sum(kinds.values())
    return {**{f"charts/workload/{w}": n / len(transitions) for w, n in workloads.items()},
            **{f"charts/kind/{KINDS[k]}": n / positions for k, n in kinds.items()}}
