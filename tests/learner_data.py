"""Data for the learner tests: a tiny verifier whose next token is a function of the current one (as in
test_online), its greedy paths, on-policy transitions written to a real Redis stream, and configs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tiny_model import tiny_llama

from buffer.config import StreamConfig
from buffer.stream import TransitionWriter
from dvi.config import set_dotted
from selfspec.greedy_paths import RecordSpec, annotate_path, simulate_rounds

K = 1  # exit layer
REPO = Path(__file__).resolve().parents[1]
# Reproducible kernels: the split would otherwise time the two kernels and pick one per process.
os.environ.setdefault("DVI_THIN_GEMM_ROWS", "none")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dvi" / "torch_extensions"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def verifier(dtype=torch.float64, seed: int = 5):
    model = tiny_llama(seed=seed, damp=1.0, init=0.3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
        model.model.norm.weight.mul_(3.0)  # a peaked distribution, as a trained LM has
    return model.to(dtype)


@torch.no_grad()
def greedy_paths(model, count: int, seed: int = 0, new_tokens: int = 32):
    """Greedy paths of `count` random 8-token prompts, decoded as one batch (the tiny model has no
    tokenizer, and greedy decoding is what any lossless decoder commits)."""
    rng = np.random.default_rng(seed)
    ids = torch.as_tensor(rng.integers(0, 256, (count, 8)))
    for _ in range(new_tokens):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    out = []
    for i, row in enumerate(ids.tolist()):
        path = annotate_path(model, row, 8, K, topk=16)
        path.prompt_id, path.category = f"p{seed}-{i}", ("chat", "code")[i % 2]
        out.append(path)
    return out


def rounds(path, head, gamma: int = 4, version: int = 0, run_id: str = "learn"):
    """On-policy transitions of `head` along `path` (the exact simulation `dvi online` uses)."""
    return simulate_rounds(path, head, gamma, RecordSpec(head_version=version, topk=16, run_id=run_id))[1]


def write(client, run_id: str, transitions, frame_size: int = 4) -> None:
    with TransitionWriter(client, run_id, StreamConfig(frame_size=frame_size, write_batch=64)) as writer:
        for t in transitions:
            writer.write(t)


def save_model(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def config(tmp: Path, redis_url: str, **overrides):
    """A learner config for the tiny verifier: small head, ZeRO 1, no held-out prompts (tests pass paths),
    kl_rl (every loss term takes part)."""
    from learner.config import LearnerConfig

    data = {"run_id": "learn", "schedule": "kl_rl", "model": str(tmp / "model"), "deepspeed": str(REPO / "configs/deepspeed/zero1.json"),
            "exit_layer": K, "head": {"adapter_hidden": 128, "lora_rank": 8}, "lr": 3e-3, "batch_size": 16,
            "min_fill": 0.01, "fill_timeout_s": 0.2, "idle_exit_s": 1.0, "publish_every_steps": 5,
            "heldout": {"prompts": 0}, "out_dir": str(tmp / "out"), "redis": {"url": redis_url},
            "stream": {"frame_size": 4, "read_block_ms": 100}}
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return LearnerConfig.model_validate(data)
