"""What one learner rank needs before its loop: the Redis client, the model, the held-out paths and the
draft vocabulary. `build_rank` puts them together (each Ray rank runs it), `run_rank` also runs the
loop (the one-process `dvi learner`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis

from learner.config import LearnerConfig


@dataclass(frozen=True)
class RankPlace:
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


def path_spec(cfg: LearnerConfig):
    from selfspec.greedy_paths import PathSpec

    return PathSpec(cfg.model, cfg.heldout.max_new_tokens, cfg.exit_layer, cfg.heldout.collect_batch)


def heldout_paths(cfg: LearnerConfig, model, tokenizer) -> list:
    """Greedy paths of the last `heldout.prompts` prompts of the held-out workload (cached per prompt)."""
    from selfspec.path_cache import cached_paths
    from selfspec.prompts import load_prompts

    h = cfg.heldout
    if h.prompts == 0:
        return []
    prompts = load_prompts(h.workload)
    if len(prompts) < h.prompts:
        raise ValueError(f"heldout.prompts = {h.prompts} but the workload {h.workload!r} has {len(prompts)} prompts")
    return cached_paths(model, tokenizer, prompts[len(prompts) - h.prompts:], path_spec(cfg))


def vocab_from_prompts(cfg: LearnerConfig, model, tokenizer) -> np.ndarray:
    """The ids the model emits most on its greedy paths of the first `vocab_prompts` prompts: the same
    choice `dvi online` makes from its training prompts (selfspec.online.frequent_ids)."""
    from selfspec.online import frequent_ids
    from selfspec.path_cache import cached_paths
    from selfspec.prompts import load_prompts
    from selfspec.split import SplitModel

    prompts = load_prompts(cfg.vocab_workload)[:cfg.vocab_prompts]
    if cfg.vocab_workload == cfg.heldout.workload:
        total = len(load_prompts(cfg.vocab_workload))
        if len(prompts) + cfg.heldout.prompts > total:
            raise ValueError(f"vocab_prompts ({cfg.vocab_prompts}) and heldout.prompts ({cfg.heldout.prompts}) "
                             f"overlap in the {total} prompts of {cfg.vocab_workload!r}")
    paths = cached_paths(model, tokenizer, prompts, path_spec(cfg))
    return frequent_ids(paths, SplitModel(model, cfg.exit_layer), cfg.head.draft_vocab)


def build_rank(cfg: LearnerConfig, place: RankPlace = RankPlace(), *, resume: bool = False,
               record_ids: bool = False):
    """Join the group and build this rank's Learner from the config; returns (learner, its metrics log or None)."""
    import torch

    from learner.dist import init_distributed
    from learner.metrics_log import MetricsLog
    from learner.trainer import Learner, LearnerSetup

    client = connect_redis(cfg)  # first: an unreachable server fails in a second, not after loading a model
    torch.set_num_threads(max(1, int(cfg.placement.num_cpus)))  # more threads than cores: many times slower
    rank, world_size = place.rank, place.world_size
    init_distributed(rank, world_size, place.master_addr, place.master_port)
    choose_vocab = rank == 0 and not resume and cfg.head.draft_vocab is not None and cfg.draft_vocab_from == "prompts"
    decode = rank == 0 and (cfg.heldout.prompts > 0 or choose_vocab)
    model, tokenizer = load_model(cfg.model, with_tokenizer=decode)
    heldout = heldout_paths(cfg, model, tokenizer) if rank == 0 else []
    vocab = vocab_from_prompts(cfg, model, tokenizer) if choose_vocab else None
    log = MetricsLog(Path(cfg.out_dir), append=resume) if rank == 0 else None
    try:
        setup = LearnerSetup(rank, world_size, resume, heldout, vocab, log, record_ids)
        learner = Learner(cfg, client, model, setup)
    except BaseException:
        if log is not None:
            log.close()
        raise
    return learner, log


def summary(learner) -> dict:
    return {"rank": learner.rank, "pid": os.getpid(), "step": learner.step, "version": learner.version,
            "counters": dict(learner.counters), "trained_ids": learner.trained_ids}


def run_rank(cfg: LearnerConfig, *, resume: bool = False, steps: int | None = None) -> dict:
    """The whole learner in this process (world size 1): build, run, close; returns its summary."""
    learner, log = build_rank(cfg, resume=resume)
    try:
        learner.run(steps)
    finally:
        log.close()
    return summary(learner)
