"""Greedy paths cached per prompt: they do not depend on the head, and a longer run reuses a shorter one's.

Each prompt's greedy continuation is stored once per (model, max_new_tokens, prompt text), and its
annotation (layer-k hidden states, verifier top-K) once per exit layer, as .npz files loaded with
allow_pickle=False. Only the prompts missing from the cache are generated, still in batches.
Sampled continuations (temperature > 0) are cached the same way, keyed also by temperature, top-p
and seed. A sample depends on the batch it was drawn in; once cached it stays fixed.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from selfspec.greedy_paths import GreedyPath, PathSpec, annotate_path, generate_paths
from selfspec.cache import cache_dir
from selfspec.model_facts import model_identity
from selfspec.prompts import Prompt

TOPK_STORED = 32


def cached_paths(model, tokenizer, prompts: list[Prompt], spec: PathSpec, folder: Path | None = None
                 ) -> list[GreedyPath]:
    """The prompts' paths as `spec` says, generated and annotated only where the cache has none."""
    folder = folder or cache_dir() / "paths"
    folder.mkdir(parents=True, exist_ok=True)
    s, exit_layer = spec.sampling, spec.exit_layer
    key = [model_identity(spec.model), spec.max_new_tokens] + ([s.temperature, s.top_p, s.seed] if s else [])
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:  # another precision has paths of its own (float32 keeps the keys it always had)
        key.append(str(dtype))
    stems = [folder / hashlib.sha256(json.dumps([*key, p.text]).encode()).hexdigest()[:24] for p in prompts]
    annotated = [stem.with_name(f"{stem.name}.k{exit_layer}.npz") for stem in stems]
    todo = [i for i, file in enumerate(annotated) if not file.exists()]
    sequences = [stem.with_name(f"{stem.name}.tokens.npz") for stem in stems]
    to_generate = [i for i in todo if not sequences[i].exists()]
    if to_generate:
        if s:
            torch.manual_seed(s.seed)
        generated = generate_paths(model, tokenizer, [prompts[i] for i in to_generate], spec)
        for i, (tokens, prompt_len) in zip(to_generate, generated):
            _save_npz(sequences[i], tokens=np.asarray(tokens, np.int32), prompt_len=np.int64(prompt_len))
    for i in tqdm(todo, desc=f"annotate k={exit_layer}", unit="prompt", disable=not todo):
        with np.load(sequences[i], allow_pickle=False) as seq:
            path = annotate_path(model, seq["tokens"].tolist(), int(seq["prompt_len"]), exit_layer, TOPK_STORED)
        _save_npz(annotated[i], tokens=path.tokens, prompt_len=np.int64(path.prompt_len), hidden=path.hidden,
                  ids=path.target_topk_ids, logprobs=path.target_topk_logprobs)
    return [_load(file, prompt) for file, prompt in zip(annotated, prompts)]


def _load(file: Path, prompt: Prompt) -> GreedyPath:
    with np.load(file, allow_pickle=False) as data:
        return GreedyPath(prompt.id, prompt.category, data["tokens"], int(data["prompt_len"]), data["hidden"],
                          data["ids"], data["logprobs"])


def _save_npz(file: Path, **arrays) -> None:
    tmp = file.with_name(file.name + ".tmp.npz")  # renamed into place: an interrupted run leaves no half file
    np.savez(tmp, **arrays)
    tmp.rename(file)
