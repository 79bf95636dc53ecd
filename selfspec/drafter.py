"""The drafter head: the only trainable part. Layer-k hidden state -> next-token logits.

residual adapter (pre-norm MLP, output layer zero-initialised) -> own copy of the final norm ->
output projection (the model's lm_head rows, frozen) with a peft LoRA on it. At initialisation the
adapter adds zero and LoRA's B is zero, so an untrained head is exactly plain early exit.

An optional reduced draft vocabulary keeps only V rows of the projection (the lm_head is ~14% of a
token on the 2-core CPU); drafted indices are mapped back to full-vocabulary ids.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, inject_adapter_in_model
from pydantic import BaseModel, ConfigDict, Field
from safetensors.numpy import load_file, save_file
from torch import nn

from selfspec.model import eos_ids
from selfspec.split import SplitModel


class HeadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exit_layer: int = Field(4, ge=1, description="layer k whose hidden state the head reads")
    adapter_hidden: int = Field(1024, ge=0, description="width of the residual MLP adapter (0: none)")
    lora_rank: int = Field(16, ge=0, description="LoRA rank on the output projection (0: none)")
    lora_alpha: float = Field(32.0, gt=0)
    draft_vocab: int | None = Field(None, ge=16, description="keep only this many output ids (None: full vocab)")
    context_window: int = Field(0, ge=0, description="committed positions of trunk hidden a transition carries")


def draft_vocab_ids(vocab_size: int, size: int, counts: np.ndarray | None = None,
                    always: tuple[int, ...] = ()) -> np.ndarray:
    """The `size` most frequent ids (by `counts`; without counts, the lowest ids: BPE vocabularies are
    built in merge order, which roughly follows frequency). `always` (EOS, ...) are kept regardless."""
    order = np.argsort(-counts, kind="stable") if counts is not None else np.arange(vocab_size)
    keep = list(dict.fromkeys([*always, *order.tolist()]))[:size]
    return np.sort(np.asarray(keep, dtype=np.int64))


class DrafterHead(nn.Module):
    def __init__(self, split: SplitModel, config: HeadConfig, vocab_ids: np.ndarray | None = None):
        super().__init__()
        if config.exit_layer != split.exit_layer:
            raise ValueError(f"head exit_layer {config.exit_layer} != split exit layer {split.exit_layer}")
        self.config = config
        d = split.config.hidden_size
        weight = split.lm_head.weight
        if config.draft_vocab is not None and vocab_ids is None:
            vocab_ids = draft_vocab_ids(weight.shape[0], config.draft_vocab, always=tuple(eos_ids(split.config)))
        self.register_buffer("vocab_ids", None if vocab_ids is None else torch.as_tensor(vocab_ids, dtype=torch.long))
        self.adapter = None
        if config.adapter_hidden:
            self.adapter = nn.Sequential(nn.RMSNorm(d, eps=1e-6), nn.Linear(d, config.adapter_hidden),
                                         nn.SiLU(), nn.Linear(config.adapter_hidden, d))
            nn.init.zeros_(self.adapter[-1].weight)
            nn.init.zeros_(self.adapter[-1].bias)
        self.norm = copy.deepcopy(split.norm)
        self.proj = nn.Linear(d, weight.shape[0] if vocab_ids is None else len(vocab_ids), bias=False)
        # Full vocabulary: share the model's (frozen) lm_head rows instead of copying 28M floats.
        self.proj.weight = weight if vocab_ids is None else nn.Parameter(weight[self.vocab_ids].clone())
        self.to(dtype=weight.dtype, device=weight.device)
        if config.lora_rank:
            inject_adapter_in_model(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                               target_modules=["proj"], lora_dropout=0.0), self)
        for name, param in self.named_parameters():
            param.requires_grad_(name.startswith(("adapter.", "norm.")) or "lora_" in name)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] -> logits over the draft vocabulary [..., V_draft]."""
        if self.adapter is not None:
            hidden = hidden + self.adapter(hidden)
        return self.proj(self.norm(hidden))

    def to_full_ids(self, idx: torch.Tensor) -> torch.Tensor:
        return idx if self.vocab_ids is None else self.vocab_ids[idx]

    def draft_fields(self, logp: torch.Tensor, draft_ids: torch.Tensor, k: int) -> dict[str, np.ndarray]:
        """The draft side of a Transition: from log-probs over the draft vocabulary [n, V_draft] and the
        drafted full-vocabulary ids [n], the behaviour log-prob of each draft and the top-k (full ids)."""
        own = draft_ids if self.vocab_ids is None else torch.searchsorted(self.vocab_ids, draft_ids)
        top = logp.topk(k, -1)
        return {"draft_tokens": draft_ids.int().cpu().numpy(),
                "draft_logprobs": logp[torch.arange(len(own)), own].float().cpu().numpy(),
                "draft_topk_ids": self.to_full_ids(top.indices).int().cpu().numpy(),
                "draft_topk_logprobs": top.values.float().cpu().numpy()}

    def trainable_state(self) -> dict[str, np.ndarray]:
        return {n: p.detach().cpu().numpy().copy() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, np.ndarray]) -> None:
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        if set(state) != set(params):
            raise ValueError(f"head state mismatch: missing {sorted(set(params) - set(state))}, "
                             f"unexpected {sorted(set(state) - set(params))}")
        with torch.no_grad():
            for name, value in state.items():
                if tuple(value.shape) != tuple(params[name].shape):
                    raise ValueError(f"head state {name}: shape {value.shape}, expected {tuple(params[name].shape)}")
                params[name].copy_(torch.from_numpy(np.asarray(value)))


def save_head(head: DrafterHead, out_dir: str | Path, meta: dict) -> Path:
    """head.safetensors (trainable params + vocab map) and head.json (config + meta)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = head.trainable_state()
    if head.vocab_ids is not None:
        tensors["vocab_ids"] = head.vocab_ids.cpu().numpy()
    save_file(tensors, str(out / "head.safetensors"))
    (out / "head.json").write_text(json.dumps({"head": head.config.model_dump(), **meta}, indent=2))
    return out


def load_head(model, path: str | Path) -> tuple[SplitModel, DrafterHead, dict]:
    """Load a head saved by save_head (its directory or head.json) onto `model`, split at its exit layer."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    if not (root / "head.json").exists():
        raise FileNotFoundError(f"no drafter checkpoint at {path}: expected head.json and head.safetensors "
                                f"(written by `dvi online --out-dir`)")
    meta = json.loads((root / "head.json").read_text())
    config = HeadConfig(**meta.pop("head"))
    split = SplitModel(model, config.exit_layer)
    tensors = load_file(str(root / "head.safetensors"))
    vocab_ids = tensors.pop("vocab_ids", None)
    head = DrafterHead(split, config, vocab_ids)
    head.load_trainable_state(tensors)
    return split, head, meta
