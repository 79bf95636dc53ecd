"""In-process online learning: draft with the current head, learn from the verifier, swap, repeat.

Each chunk of training prompts is decoded along its greedy path (batched; see greedy_paths), the
current head's drafting is replayed to produce on-policy Transitions, a few optimizer steps are
taken on the head only, and the new head drafts the next chunk. Held-out prompts, never trained on,
measure mean accepted length (MAL) at a fixed γ before, during and after training.

Writing metrics, plots and the head is the caller's (`dvi online`): the loop reports each record to
a `log(record)` callable.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from selfspec.config import OnlineConfig
from selfspec.drafter import DrafterHead, draft_vocab_ids
from selfspec.greedy_paths import (GreedyPath, RecordSpec, PathSpec, Sampling, mean_accepted_length, prompt_transitions,
                                   response_transitions, simulate_rounds)
from selfspec.model import eos_ids, load_model
from selfspec.ngram import mean_accepted_length_with_ngram
from selfspec.objectives import TrainState, train_step
from selfspec.path_cache import cached_paths
from selfspec.prompts import load_prompts
from selfspec.split import SplitModel
from selfspec.versions import package_versions


def path_spec(cfg: OnlineConfig) -> PathSpec:
    return PathSpec(cfg.model, cfg.max_new_tokens, cfg.exit_layer, cfg.collect_batch)


def cached_paths_for(model, tokenizer, cfg: OnlineConfig, prompts) -> list[GreedyPath]:
    """The prompts' greedy paths at cfg's model, length and exit layer, from the per-prompt cache."""
    return cached_paths(model, tokenizer, prompts, path_spec(cfg))


def sampled_paths_for(model, tokenizer, cfg: OnlineConfig, prompts) -> list[list[GreedyPath]]:
    """cfg.sampled_responses sampled responses per prompt (seeds 0, 1, ...), from the same cache."""
    sampled = [replace(path_spec(cfg), sampling=Sampling(cfg.sample_temperature, cfg.sample_top_p, seed))
               for seed in range(cfg.sampled_responses)]
    per_seed = [cached_paths(model, tokenizer, prompts, spec) for spec in sampled]
    return [list(responses) for responses in zip(*per_seed)] if per_seed else [[] for _ in prompts]


def frequent_ids(paths: list[GreedyPath], split: SplitModel, size: int | None) -> np.ndarray | None:
    """A reduced draft vocabulary: the ids the model itself emits most often on the training prompts."""
    if size is None:
        return None
    counts = np.zeros(split.config.vocab_size)
    for p in paths:
        np.add.at(counts, p.tokens[p.prompt_len:], 1)
    return draft_vocab_ids(len(counts), size, counts, tuple(eos_ids(split.config)))


def split_prompts(cfg: OnlineConfig):
    """(train from the workload, train from `extra_train_workload`, held-out). Held-out is the
    workload's tail; training takes the workload's head first, then the extra prompts, so a longer
    run sees a shorter run's prompts in the same order."""
    prompts = load_prompts(cfg.workload)
    own = max(len(prompts) - cfg.heldout_prompts, 0)
    extra = load_prompts(cfg.extra_train_workload) if cfg.extra_train_workload else []
    if cfg.train_prompts > own + len(extra):
        raise ValueError(f"train_prompts = {cfg.train_prompts} but the workload {cfg.workload!r} has only {own} "
                         f"prompts besides its {cfg.heldout_prompts} held-out ones"
                         + (f", plus {len(extra)} in {cfg.extra_train_workload!r}" if extra else
                            "; add more with extra_train_workload (see `dvi synth-prompts`)"))
    return (prompts[:min(cfg.train_prompts, own)], extra[:max(cfg.train_prompts - own, 0)],
            prompts[len(prompts) - cfg.heldout_prompts:])


@dataclass
class OnlinePaths:
    """What the online loop learns from and is judged on. `sampled[i]`: more responses to training
    prompt i, distilled on in the same chunk as its greedy path."""
    train: list[GreedyPath]
    heldout: list[GreedyPath]
    sampled: list[list[GreedyPath]] = field(default_factory=list)

    def __post_init__(self):
        self.sampled = self.sampled or [[] for _ in self.train]
        if len(self.sampled) != len(self.train):  # zip would silently drop training prompts
            raise ValueError(f"sampled responses for {len(self.sampled)} prompts, but {len(self.train)} training prompts")


@dataclass
class OnlineResult:
    curve: list[dict]  # held-out MAL after each chunk, the untrained head first
    steps: int
    versions: int


Log = Callable[[dict], None]


def load_online_paths(cfg: OnlineConfig, model, tokenizer) -> OnlinePaths:
    train, extra, heldout = split_prompts(cfg)
    return OnlinePaths(cached_paths_for(model, tokenizer, cfg, train + extra),
                       cached_paths_for(model, tokenizer, cfg, heldout),
                       sampled_paths_for(model, tokenizer, cfg, train + extra))


def run_online(cfg: OnlineConfig, model=None, tokenizer=None, log: Log | None = None,
               progress: bool = True) -> tuple[DrafterHead, dict]:
    """Train a fresh head on cfg's workload; returns it and a summary (MAL before and after, curve)."""
    torch.manual_seed(cfg.seed)
    if model is None:
        model, tokenizer = load_model(cfg.model, cfg.dtype, cfg.device)
    paths = load_online_paths(cfg, model, tokenizer)
    split = SplitModel(model, cfg.exit_layer)
    head = DrafterHead(split, cfg.head, frequent_ids(paths.train, split, cfg.head.draft_vocab))
    start = time.time()
    result = train_on_paths(head, paths, cfg, log, progress)
    curve = result.curve
    summary = {"mal_before": curve[0]["mal_heldout"], "mal_after": curve[-1]["mal_heldout"], "gamma": cfg.gamma,
               # the engine's `ngram` option: copied drafts where the text recurs, the head elsewhere
               "mal_ngram_only": mean_accepted_length_with_ngram(paths.heldout, cfg.gamma),
               "mal_after_with_ngram": mean_accepted_length_with_ngram(paths.heldout, cfg.gamma, head),
               "train_prompts": len(paths.train), "heldout_prompts": len(paths.heldout), "steps": result.steps,
               "head_versions": result.versions, "sampled_responses": cfg.sampled_responses,
               "schedule": cfg.schedule, "exit_layer": cfg.exit_layer, "workload": cfg.workload,
               "seconds": time.time() - start, "curve": curve, "config": cfg.model_dump(),
               "versions": package_versions()}  # the packages (selfspec.versions); head versions: head_versions
    return head, summary


def _chunk_transitions(head: DrafterHead, paths: OnlinePaths, chunk: range, cfg: OnlineConfig, version: int):
    """On-policy transitions of the current head along a chunk of training paths (plus prompt and
    sampled-response positions when configured), and the accepted drafts per simulated round."""
    transitions, accepted = [], []
    for i in chunk:
        path = paths.train[i]
        record = RecordSpec(head_version=version, topk=cfg.topk)
        acc, trs = simulate_rounds(path, head, cfg.gamma, record)
        transitions += trs
        accepted += acc
        if cfg.prompt_positions:
            transitions += prompt_transitions(path, head, cfg.gamma, record)
        for seed, response in enumerate(paths.sampled[i]):
            transitions += response_transitions(response, head, cfg.gamma, f"sampled{seed}", record)
    return transitions, accepted


def train_on_paths(head: DrafterHead, paths: OnlinePaths, cfg: OnlineConfig, log: Log | None = None,
                   progress: bool = True) -> OnlineResult:
    """The online loop proper: per chunk of prompts, the current head drafts (simulated exactly along
    the greedy paths), `epochs` passes of `train_step` over the chunk's transitions, a new version."""
    log = log or (lambda record: None)
    rng = random.Random(cfg.seed)
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    state = TrainState.create(cfg.schedule, cfg.schedule_config, cfg.loss)
    head.eval()
    curve = [{"prompts": 0, "step": 0, "mal_heldout": mean_accepted_length(paths.heldout, head, cfg.gamma)}]
    step, version, metrics = 0, 0, {}
    with tqdm(total=len(paths.train), desc="online", unit="prompt", disable=not progress) as bar:
        for chunk_start in range(0, len(paths.train), cfg.chunk_prompts):
            chunk = range(chunk_start, min(chunk_start + cfg.chunk_prompts, len(paths.train)))
            transitions, accepted = _chunk_transitions(head, paths, chunk, cfg, version)
            head.train()
            for _ in range(cfg.epochs):
                rng.shuffle(transitions)
                for b in range(0, len(transitions), cfg.batch_size):
                    metrics = train_step(head, optimizer, transitions[b:b + cfg.batch_size], state, cfg.loss)
                    step += 1
                    log({"step": step, "version": version, **metrics})
            version += 1  # in-process the swap is immediate: the next chunk drafts with this head
            head.eval()
            point = {"prompts": chunk.stop, "step": step,
                     "mal_heldout": mean_accepted_length(paths.heldout, head, cfg.gamma),
                     "mal_train_chunk": float(np.mean(accepted) + 1) if accepted else 1.0}
            curve.append(point)
            log({"step": step, "version": version, "prompts": chunk.stop,
                 "charts/mal_heldout": point["mal_heldout"], "charts/mal_train_chunk": point["mal_train_chunk"]})
            bar.set_postfix_str(f"MAL held-out {point['mal_heldout']:.3f} train {point['mal_train_chunk']:.3f} "
                                f"kl {metrics.get('losses/kl', float('nan')):.2f}")
            bar.update(len(chunk))
    return OnlineResult(curve, step, version)
