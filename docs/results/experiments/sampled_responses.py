"""Exploratory: more training text from the same real prompts, by sampling several responses each,
trained on after all the greedy paths (`dvi online --set sampled_responses=N` instead trains on each
prompt's sampled responses in the same chunk as its greedy path, as traffic would bring them).

The head is data-limited, and Spec-Bench has only 440 training questions. Instead of prompts the
model writes itself (`dvi synth-prompts`), each real training prompt gets SAMPLES more responses
sampled at T=0.8, top-p 0.95; the verifier's distributions along them are as good distillation
targets as along greedy text. The online loop trains on the 440 greedy paths first, then on the
sampled ones, so the held-out curve (greedy, the same 40 questions) shows both. KL only: along a
sampled path, "accepted" (the head's argmax equals the path's token) is not what greedy verification
would decide, so the RL terms' rewards would be off.

    python docs/results/experiments/sampled_responses.py SAMPLES OUT_DIR
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

from dvi.config import load_config
from selfspec.drafter import DrafterHead
from selfspec.model import load_model
from dvi.report.plots import plot_mal_curves
from selfspec.online import (OnlineConfig, OnlinePaths, cached_paths_for, frequent_ids, sampled_paths_for, split_prompts,
                             train_on_paths)
from selfspec.split import SplitModel

samples, out = int(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(2)
cfg = load_config(OnlineConfig, "configs/online.yaml").model_copy(update={"train_prompts": 440, "epochs": 6,
                                                                           "schedule": "kl_only",
                                                                           "sampled_responses": samples})
cfg.head.draft_vocab = 8192
model, tok = load_model(cfg.model)
train, _, held = split_prompts(cfg)
greedy, heldout = cached_paths_for(model, tok, cfg, train), cached_paths_for(model, tok, cfg, held)

sampled = [path for per_seed in zip(*sampled_paths_for(model, tok, cfg, train)) for path in per_seed]

torch.manual_seed(cfg.seed)
split = SplitModel(model, cfg.exit_layer)
head = DrafterHead(split, cfg.head, frequent_ids(greedy, split, cfg.head.draft_vocab))
out.mkdir(parents=True, exist_ok=True)
result = train_on_paths(head, OnlinePaths(greedy + sampled, heldout), cfg)
curve, steps = result.curve, result.steps
(out / "summary.json").write_text(json.dumps({"samples": samples, "steps": steps, "curve": curve}, indent=2))
plot_mal_curves([(f"440 greedy, then {samples}x440 sampled", curve)], out / "mal.png", cfg.gamma)
at = {c["prompts"]: c["mal_heldout"] for c in curve}
print({n: round(np.mean([at[m] for m in at if n - 40 < m <= n]), 3) for n in (440, 880, 1320, 1760) if n <= max(at)})
