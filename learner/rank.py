"""What one learner rank needs before its loop: the Redis client, the model, the held-out paths (on a
background thread) and the draft vocabulary. `build_rank` puts them together (each Ray rank runs it), `run_rank` also runs the
loop (the one-process `dvi learner`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis

from buffer.keys import RunKeys
from learner.config import LearnerConfig


@dataclass(frozen=True)
class RankAddress:
    """Where a rank sits in the DeepSpeed process group."""
    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port (one process)


def connect_redis(cfg: LearnerConfig) -> redis.Redis:
    from buffer.connection import connect
    from buffer.server import resolve_password

    if not cfg.redis.url:
        raise ValueError("redis.url: the learner reads a running server's stream: give --redis-url redis://HOST:PORT "
                         "(`dvi redis start` starts one)")
    return connect(cfg.redis.url, resolve_password(cfg.redis), timeout_s=cfg.redis.connect_timeout_s,
                   password_env=cfg.redis.password_env)


def load_model(spec: str, with_tokenizer: bool):
    """The model (float32, eval, frozen), and its tokenizer only when prompts must be decoded: the head
    itself needs only the weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from selfspec import model as models

    if with_tokenizer:
        return models.load_model(spec)
    model = AutoModelForCausalLM.from_pretrained(models.resolve_model_dir(spec), dtype=torch.float32)
    return model.eval().requires_grad_(False), None


def clear_stop(cfg: LearnerConfig) -> None:
    """A new learner (group) starts without the stop request an earlier one may have left."""
    connect_redis(cfg).delete(RunKeys(cfg.run_id).learner_stop)


def served_vocab(client: redis.Redis, cfg: LearnerConfig, model_config, status) -> np.ndarray:
    """The draft vocabulary from the first `vocab_tokens` served positions (learner.served_vocab)."""
    from learner.served_vocab import served_token_counts
    from selfspec.drafter import draft_vocab_ids
    from selfspec.model import eos_ids

    keys = RunKeys(cfg.run_id)
    counts = served_token_counts(client, cfg.run_id, model_config.vocab_size, cfg.vocab_tokens,
                                 stop=lambda: bool(client.exists(keys.learner_stop)), status=status)
    return draft_vocab_ids(len(counts), cfg.head.draft_vocab, counts, tuple(eos_ids(model_config)))


def build_rank(cfg: LearnerConfig, place: RankAddress = RankAddress(), *, resume: bool = False,
               record_ids: bool = False):
    """Join the group and build this rank's Learner from the config; returns (learner, its metrics log or None).
    Nothing here waits for generation: the held-out paths come on a background thread, and a served
    draft vocabulary only waits for the actors' first transitions."""
    import torch

    from learner.dist import init_distributed
    from learner.heldout import HeldoutPaths
    from learner.metrics_log import MetricsLog
    from learner.status import LearnerStatus
    from learner.trainer import Learner, LearnerSetup

    client = connect_redis(cfg)  # first: an unreachable server fails in a second, not after loading a model
    rank, world_size = place.rank, place.world_size
    status = LearnerStatus(client if rank == 0 else None, cfg.run_id)
    status.set("setup", "joining the process group")
    torch.set_num_threads(max(1, int(cfg.placement.num_cpus)))  # more threads than cores: many times slower
    init_distributed(rank, world_size, place.master_addr, place.master_port)
    status.set("setup", f"loading {cfg.model}")
    score = rank == 0 and cfg.heldout.prompts > 0
    model, tokenizer = load_model(cfg.model, with_tokenizer=score)
    heldout = HeldoutPaths.generate(cfg, model, tokenizer, status) if score else None
    choose_vocab = rank == 0 and not resume and cfg.head.draft_vocab is not None and cfg.draft_vocab_from == "served"
    vocab = served_vocab(client, cfg, model.config, status) if choose_vocab else None
    log = MetricsLog(Path(cfg.out_dir), append=resume) if rank == 0 else None
    try:
        setup = LearnerSetup(rank, world_size, resume, heldout, vocab, log, record_ids)
        learner = Learner(cfg, client, model, setup)
    except BaseException:
        if log is not None:
            log.close()
        raise
    status.set("setup", f"training; version {learner.version} published")
    return learner, log


def summary(learner) -> dict:
    return {"rank": learner.rank, "pid": os.getpid(), "step": learner.step, "version": learner.version,
            "counters": dict(learner.counters), "trained_ids": learner.trained_ids}


def run_rank(cfg: LearnerConfig, *, resume: bool = False, steps: int | None = None) -> dict:
    """The whole learner in this process (world size 1): build, run, close; returns its summary."""
    clear_stop(cfg)
    learner, log = build_rank(cfg, resume=resume)
    try:
        learner.run(steps)
    finally:
        log.close()
    return summary(learner)
