"""Learner throughput (one rank and several), publish latency, and how many generation processes one
learner rank keeps up with: `dvi bench-learner`.

The learner runs exactly as `dvi learner` does (DeepSpeed, the config's head, a fresh local
redis-server) on a stream filled beforehand with random transitions shaped like real ones (the
config's hidden size, `positions` verified positions per round, top-16), so it never waits for
data: what is measured is how fast it consumes. The generation rate is one SmolLM2 decoding process
(`dvi generate`'s defaults: cost-aware γ<=4, copied n-gram drafts, the untrained head; one thread,
as a generation actor with num_cpus=1) emitting a transition per round into a counting sink.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dvi.report.format import read_jsonl
from selfspec.versions import package_versions


@dataclass(frozen=True)
class LearnerBenchSpec:
    """What `dvi bench-learner` measures (its flags)."""
    config: str  # the learner config whose head and batch to measure
    layouts: list[tuple[int, int]]  # (ranks, torch threads per rank)
    steps: int = 40  # optimizer steps per measurement (more than warmup)
    warmup: int = 5  # first steps left out of the rates
    positions: int = 4  # verified positions per transition
    generation_prompts: int = 4  # builtin prompts decoded for the generation rate (0: skip)
    max_new_tokens: int = 128
    generation_threads: int = 1
    overrides: dict = field(default_factory=dict)  # learner config keys (--set)


def run_learner_bench(spec: LearnerBenchSpec) -> dict:
    """Each layout's learner rates on a pre-filled stream, then the generation rate; the report
    (bench_learner.json's content)."""
    from buffer.config import RedisConfig
    from buffer.server import RedisServer
    from dvi.config import load_config
    from learner.config import LearnerConfig

    cpus = os.cpu_count() or 1
    report = {"command": "dvi bench-learner", "config": spec.config, "steps": spec.steps, "warmup": spec.warmup,
              "positions_per_transition": spec.positions, "cpus": cpus,
              "load_avg_1m_before": round(os.getloadavg()[0], 2), "versions": package_versions(), "learner": {}}
    with tempfile.TemporaryDirectory() as tmp, RedisServer(RedisConfig(persistence=False), Path(tmp) / "redis") as srv:
        for n, threads in spec.layouts:
            run_id = f"bench{n}x{threads}"
            cfg = load_config(LearnerConfig, spec.config, {
                **spec.overrides, "run_id": run_id, "redis.url": srv.url, "draft_vocab_from": "lowest",
                "heldout.prompts": 0, "out_dir": str(Path(tmp) / run_id), "max_steps": spec.steps, "idle_exit_s": 30,
                "publish_every_steps": 5, "publish_every_s": 3600, "checkpoint.every_steps": 10**6,
                "placement.ranks": n, "placement.num_cpus": threads,
                "stream.max_transition_lag": 10**9})  # the pre-filled transitions must not go stale as versions move
            report["model"], report["head"] = cfg.model, cfg.head.model_dump()
            report["batch_size"], report["deepspeed"] = cfg.batch_size, cfg.deepspeed
            _fill(srv.client(), cfg, spec)
            started = time.perf_counter()
            _learn(cfg)
            report["learner"][f"{n}x{threads}"] = {
                **_rates(Path(cfg.out_dir), spec.warmup), "ranks": n, "threads_per_rank": threads,
                "wall_s_with_setup": round(time.perf_counter() - started, 1)}
        if spec.generation_prompts:
            report["generation"] = _generation(cfg, spec)
            gen = report["generation"]
            for name, r in report["learner"].items():
                r["generation_processes_kept_up_with"] = round(r["positions_per_s"] / gen["positions_per_s"], 1)
    return report


def _fill(client, cfg, spec: LearnerBenchSpec) -> None:
    """Enough transitions for every step, written before the learner starts (it never waits for data)."""
    import numpy as np

    from buffer.stream import TransitionWriter
    from buffer.synthetic import random_transition
    from selfspec.model import resolve_model_dir

    model_config = json.loads((resolve_model_dir(cfg.model) / "config.json").read_text())
    rng = np.random.default_rng(0)
    pool = [random_transition(rng, n=spec.positions, d=model_config["hidden_size"], k=16, run_id=cfg.run_id,
                              request_id=f"q{i}") for i in range(64)]
    for t in pool:  # token ids within this model's vocabulary
        for name in ("draft_tokens", "draft_topk_ids", "target_topk_ids", "target_tokens"):
            setattr(t, name, getattr(t, name) % model_config["vocab_size"])
    with TransitionWriter(client, cfg.run_id, cfg.stream) as writer:
        for i in range(cfg.batch_size * (spec.steps + 2)):
            t = pool[i % len(pool)]
            t.round = i  # distinct ids: de-duplication keeps all
            writer.write(t)


def _learn(cfg) -> None:
    if cfg.placement.ranks == 1:
        from learner.rank import run_rank

        run_rank(cfg)
        return
    import ray

    from learner.launch import LearnerGroup

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        group = LearnerGroup(cfg)
        group.run()
        group.shutdown()
    finally:
        ray.shutdown()


def _rates(out: Path, warmup: int) -> dict:
    records = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in records if "losses/total" in r][warmup:]
    seconds = sum(1 / r["charts/steps_per_s"] for r in steps)
    train_s = sum(r["charts/train_s"] for r in steps)
    transitions = sum(r["charts/batch_transitions"] for r in steps)
    positions = sum(r["charts/batch_positions"] for r in steps)
    versions = read_jsonl(out / "versions.jsonl")
    commits = [r["charts/checkpoint_s"] for r in records if "charts/checkpoint_s" in r]
    return {"steps_per_s": round(len(steps) / seconds, 2), "transitions_per_s": round(transitions / seconds),
            "positions_per_s": round(positions / seconds), "train_share": round(train_s / seconds, 2),
            "publish_ms_median": round(statistics.median(v["latency_ms"] for v in versions), 1),
            "publish_ms_max": round(max(v["latency_ms"] for v in versions), 1),
            "blob_mb": round(versions[-1]["bytes"] / 1e6, 2), "versions": len(versions),
            "commit_s": round(commits[-1], 2) if commits else None}  # DeepSpeed checkpoint + acknowledgement


def _generation(cfg, spec: LearnerBenchSpec) -> dict:
    """One decoding process with the config's (untrained) head, dvi generate's defaults."""
    import torch

    from selfspec.copy_sources import CopySources
    from selfspec.engine import TransitionSink, SelfSpecDecoder
    from selfspec.loading import load_model_parts, make_length_policy
    from selfspec.model import quiet_transformers
    from selfspec.prompts import chat_ids, load_prompts

    quiet_transformers()
    torch.set_num_threads(spec.generation_threads)
    parts = load_model_parts(cfg.model, cfg.exit_layer, head_config=cfg.head)
    counts = {"transitions": 0, "positions": 0}

    def sink(t):
        counts["transitions"] += 1
        counts["positions"] += t.n

    decoder = SelfSpecDecoder(parts.split, parts.head, make_length_policy("cost_aware", 4, parts.passes, parts.head),
                              CopySources(ngram=1), sink=TransitionSink(sink), passes=parts.passes)
    prompts = load_prompts("builtin")[:spec.generation_prompts]
    tokens, seconds = 0, 0.0
    for p in prompts:
        result = decoder.generate(chat_ids(parts.tokenizer, p.text), max_new_tokens=spec.max_new_tokens)
        tokens, seconds = tokens + len(result.tokens), seconds + result.t_total
    return {"prompts": len(prompts), "tokens_per_s": round(tokens / seconds, 1),
            "transitions_per_s": round(counts["transitions"] / seconds, 1),
            "positions_per_s": round(counts["positions"] / seconds, 1),
            "positions_per_transition": round(counts["positions"] / max(counts["transitions"], 1), 2),
            "threads": spec.generation_threads, "policy": "cost_aware gamma<=4, ngram 1, untrained head"}
