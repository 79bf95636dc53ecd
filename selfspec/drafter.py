"""The drafter head: the only trainable part. Layer-k hidden states -> next-token logits.

[attention adapter] -> residual adapter (pre-norm MLP, output layer zero-initialised) -> own copy of
the final norm -> output projection (the model's lm_head rows, frozen) with a peft LoRA on it. At
initialisation the MLP adapter adds zero and LoRA's B is zero, so an untrained MLP head is exactly
plain early exit.

The optional attention adapter (Kangaroo / EAGLE style) is a copy of the model's decoder layers
k, k+1, ... that attends over the trunk's hidden states of the last `context_window` positions, with
its own small KV cache; initialised from the model's own layers, it starts as early exit at k+1.
Its receptive field is bounded (each of L layers looks back W / L positions) so that a Transition's
`context_hidden` (the W committed positions before the draft) holds everything the head saw: training from a transition reproduces the draft
logits exactly.

An optional reduced draft vocabulary keeps only V rows of the projection (the full lm_head is a large
share of a small model's token); drafted indices are mapped back to full-vocabulary ids.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from selfspec.config import HeadConfig
from selfspec.head_format import HeadSpec, read_head, write_head
from selfspec.kv_cache import KVCache, cache_arg
from selfspec.model import eos_ids
from selfspec.small_batch_linear import use_small_batch_linears
from selfspec.split import SplitModel


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
        self.config, self.exit_layer = config, split.exit_layer  # the split owns the exit layer
        d = split.config.hidden_size
        weight = split.lm_head.weight
        if config.draft_vocab is not None and vocab_ids is None:
            vocab_ids = draft_vocab_ids(weight.shape[0], config.draft_vocab, always=tuple(eos_ids(split.config)))
        self.register_buffer("vocab_ids", None if vocab_ids is None else torch.as_tensor(vocab_ids, dtype=torch.long))
        k, n_attn = split.exit_layer, config.attention_layers
        if k + n_attn > split.num_layers:
            raise ValueError(f"attention_layers {n_attn} from exit layer {k}: the model has only {split.num_layers} layers")
        self.layers = nn.ModuleList(copy.deepcopy(layer) for layer in split.layers[k:k + n_attn])
        for i, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = i  # its slot in the head's own KV cache
        self.rotary = copy.deepcopy(split.rotary) if n_attn else None
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
        use_small_batch_linears(self, split.thin_rows)
        if config.lora_rank:
            inject_adapter_in_model(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                               target_modules=["proj"], lora_dropout=0.0), self)
        for name, param in self.named_parameters():
            param.requires_grad_(name.startswith(("adapter.", "norm.", "layers.")) or "lora_" in name)

    @property
    def attends(self) -> bool:
        return len(self.layers) > 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Readout of already-attended hidden [..., d] -> logits over the draft vocabulary [..., V_draft].
        For a head without attention layers this is the whole head."""
        if self.adapter is not None:
            hidden = hidden + self.adapter(hidden)
        return self.proj(self.norm(hidden))

    def _attend(self, hidden: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, key_valid=None,
                cache: KVCache | None = None) -> torch.Tensor:
        """The attention layers on hidden [B, n, d] at `positions` [n], over keys at positions `keys`
        [S] (the cache plus these, or the sequence itself): causal, each layer at most
        context_window / layers positions back, so that the stack never reaches further back than
        `context_window` positions. `key_valid` [B, S] masks padding."""
        window = self.config.context_window // len(self.layers)
        mask = ((keys[None, :] <= positions[:, None]) & (keys[None, :] >= positions[:, None] - window))[None, None]
        if key_valid is not None:  # a query always sees itself, so a padding row is never all-masked (NaN)
            mask = mask & key_valid[:, None, None, :] | (keys[None, :] == positions[:, None])[None, None]
        position_ids = positions[None].expand(hidden.shape[0], -1)
        rope = self.rotary(hidden, position_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                           use_cache=cache is not None, position_embeddings=rope, **cache_arg(layer, cache))
        return hidden

    def new_cache(self, capacity: int) -> KVCache | None:
        if not self.attends:
            return None
        attn = self.layers[0].self_attn
        p = next(self.parameters())
        return KVCache(len(self.layers), attn.config.num_key_value_heads, attn.head_dim, capacity, p.dtype, p.device)

    def next_logits(self, hidden: torch.Tensor, start: int, cache: KVCache | None) -> torch.Tensor:
        """Decoding: layer-k hidden [B, n, d] of positions start.. (committed positions the head has not
        seen yet, then the newest) -> logits for the token after each row's last one [B, V_draft]. An
        attention head reads its own cache: one row (B = 1) per call."""
        if not self.attends:
            return self(hidden[:, -1])
        # Positions before start - window are never attended again: jumping over them leaves a harmless hole.
        cache.seek(start)
        positions = torch.arange(start, start + hidden.shape[1], device=hidden.device)
        keys = torch.arange(start + hidden.shape[1], device=hidden.device)
        return self(self._attend(hidden, positions, keys, cache=cache)[:, -1])

    def path_logits(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Teacher forcing along a committed sequence: hidden [T, d] of positions 0..T-1 -> logits for
        the positions start..end-1 [end - start, V_draft], exactly what decoding would compute there."""
        if not self.attends:
            return self(hidden[start:end])
        lo = max(0, start - self.config.context_window)
        positions = torch.arange(end - lo, device=hidden.device)
        return self(self._attend(hidden[None, lo:end], positions, positions)[0, start - lo:])

    def batch_logits(self, hidden: torch.Tensor, context: torch.Tensor | None = None,
                     context_len: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Training: the drafted positions of R transitions, flattened to hidden [N, d], with each
        transition's context left-padded to context [R, W, d] (`context_len` [R] valid positions) and
        `rows` [N, 2] = (transition, offset among its drafted positions) -> logits [N, V_draft]."""
        if not self.attends:
            return self(hidden)
        n_rounds, width = context.shape[:2]
        span = int(rows[:, 1].max()) + 1
        seq = torch.cat([context, hidden.new_zeros(n_rounds, span, hidden.shape[1])], 1)
        seq[rows[:, 0], width + rows[:, 1]] = hidden
        keys = torch.arange(width + span, device=hidden.device)
        drafted = torch.zeros(n_rounds, span, dtype=torch.bool, device=hidden.device)
        drafted[rows[:, 0], rows[:, 1]] = True
        valid = torch.cat([keys[None, :width] >= (width - context_len)[:, None], drafted], 1)
        out = self._attend(seq, keys, keys, key_valid=valid)
        return self(out[rows[:, 0], width + rows[:, 1]])

    def to_full_ids(self, idx: torch.Tensor) -> torch.Tensor:
        return idx if self.vocab_ids is None else self.vocab_ids[idx]

    def draft_fields(self, logp: torch.Tensor, draft_ids: torch.Tensor, k: int) -> dict[str, np.ndarray]:
        """The draft side of a Transition: from log-probs over the draft vocabulary [n, V_draft] and the
        drafted full-vocabulary ids [n], the behaviour log-prob of each draft and the top-k (full ids)."""
        own = (draft_ids if self.vocab_ids is None
               else torch.searchsorted(self.vocab_ids, draft_ids.to(self.vocab_ids.device)))
        top = logp.topk(k, -1)
        return {"draft_tokens": draft_ids.int().cpu().numpy(),
                "draft_logprobs": logp[torch.arange(len(own)), own].float().cpu().numpy(),
                "draft_topk_ids": self.to_full_ids(top.indices).int().cpu().numpy(),
                "draft_topk_logprobs": top.values.float().cpu().numpy()}

    def trainable_state(self) -> dict[str, np.ndarray]:
        """Trainable parameters as numpy arrays (float32 for a bf16/fp16 head: numpy has no bfloat16)."""
        return {n: (p.detach() if p.dtype in (torch.float32, torch.float64) else p.detach().float()).cpu().numpy().copy()
                for n, p in self.named_parameters() if p.requires_grad}

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


def head_weights(head: DrafterHead) -> tuple[dict[str, np.ndarray], dict]:
    """The head as data (selfspec.head_format): arrays = its trainable parameters (float32 when trained in
    bf16, which numpy lacks) and its draft vocabulary; meta = its config and exit layer."""
    arrays = head.trainable_state()
    if head.vocab_ids is not None:
        arrays["vocab_ids"] = head.vocab_ids.cpu().numpy().astype(np.int64)
    return arrays, {"head": head.config.model_dump(), "exit_layer": head.exit_layer}


def head_from_weights(split: SplitModel, arrays: dict[str, np.ndarray], meta: dict) -> DrafterHead:
    """A fresh DrafterHead equal to the one whose weights these are (head_weights) on `split`, at the split's
    precision; HeadMismatch if they do not fit it (HeadSpec.problem)."""
    arrays = {name: np.array(value) for name, value in arrays.items()}  # decoded blobs are read-only views
    head = DrafterHead(split, HeadConfig(**meta["head"]), arrays.get("vocab_ids"))
    spec = HeadSpec.of(*head_weights(head))
    arrays = spec.to_precision(arrays)
    spec.check(arrays, meta)
    head.load_trainable_state({name: value for name, value in arrays.items() if name != "vocab_ids"})
    return head


def save_head(head: DrafterHead, out_dir: str | Path, meta: dict) -> Path:
    """head.safetensors and head.json (selfspec.head_format.write_head) of the head's weights, `meta` added."""
    arrays, own = head_weights(head)
    return write_head(out_dir, arrays, own | meta)


def load_head(model, path: str | Path) -> tuple[SplitModel, DrafterHead, dict]:
    """Load a head saved by save_head (its directory or head.json) onto `model`, split at its exit layer;
    returns the split, the head and the rest of its meta."""
    arrays, meta = read_head(path)
    split = SplitModel(model, meta["exit_layer"])
    head = head_from_weights(split, arrays, meta)
    return split, head, {k: v for k, v in meta.items() if k not in ("head", "exit_layer")}
