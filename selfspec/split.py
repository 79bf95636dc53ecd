"""One Hugging Face causal LM viewed as trunk (layers [0,k)) + verifier (layers [k,L), norm, lm_head).

Only the decoder layers' own forward is used, so any Llama-like HF model works; plain Llama layers
run as lean tensor code that computes the same (selfspec.lean_layers). Both halves share one
cache and one set of rotary embeddings: a token's trunk pass during drafting is the same pass the
verifier would have run, which is what lets verification start at layer k.
"""
from __future__ import annotations

import os

import torch

from selfspec.device import decode_attention
from selfspec.kv_cache import BatchKVCache, Block, StaticKVCache, cache_arg
from selfspec.lean_layers import lean_layers
from selfspec.small_batch_linear import ALL_ROWS, small_batch_copy
from selfspec.pass_costs import measure_thin_rows, parse_rows

_THIN_ROWS: dict[tuple, frozenset[int]] = {}  # measured once per process for each model shape and thread count


class SplitModel:
    def __init__(self, model, exit_layer: int, lean: bool = True):
        base = model.model
        self.num_layers = len(base.layers)
        if not 1 <= exit_layer <= self.num_layers - 1:
            raise ValueError(f"exit layer {exit_layer} out of range: must be in [1, {self.num_layers - 1}] "
                             f"for this {self.num_layers}-layer model")
        self.model = model
        self.config = model.config
        self.exit_layer = exit_layer
        # Row counts whose products run as a thin GEMM (selfspec/small_batch_linear.py): one set, shared
        # by every linear of the split and its head, measured on this machine below.
        self.thin_rows: set[int] = set(ALL_ROWS)
        # Copies sharing the weights, so that `model` itself (what hf_ar runs) keeps its own kernels.
        self.layers = small_batch_copy(base.layers, self.thin_rows)
        self.lean = lean_layers(self.layers, model.config, self.thin_rows) if lean else None
        self.embed = base.embed_tokens
        self.rotary = base.rotary_emb
        self.norm = base.norm
        self.lm_head = small_batch_copy(model.lm_head, self.thin_rows)
        self.max_positions = getattr(model.config, "max_position_embeddings", 1 << 30)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            self._choose_kernels(model)

    def _choose_kernels(self, model) -> None:
        fixed = os.environ.get("DVI_THIN_GEMM_ROWS")
        if fixed is not None:  # tests and reproducible runs: no timing-dependent start-up
            self.use_thin_gemm_for(parse_rows(fixed))
            return
        key = (tuple(tuple(p.shape) for p in model.parameters()), self.dtype, self.lean is not None,
               torch.get_num_threads())
        if key not in _THIN_ROWS:
            _THIN_ROWS[key] = measure_thin_rows(self)
        self.use_thin_gemm_for(_THIN_ROWS[key])

    def use_thin_gemm_for(self, rows) -> None:
        """Run products of these row counts as a thin GEMM, all others with F.linear, in every linear of
        the split and of heads built on it (they share the set)."""
        self.thin_rows.clear()
        self.thin_rows.update(rows)

    def new_cache(self, capacity: int, slots: int = 1) -> BatchKVCache:
        return BatchKVCache(self.config, capacity, self.dtype, self.device, slots)

    def _run(self, hidden: torch.Tensor, lo: int, hi: int, start: int | Block,
             cache: BatchKVCache | StaticKVCache) -> torch.Tensor:
        """Layers [lo, hi) on hidden [B, n, d], writing the cache: row b at positions start.., as a Block
        says (an int: one row). A StaticKVCache reads the starts set on it before (selfspec.passes)."""
        positions, mask = cache.place(Block.of(start, hidden.shape[1]), hidden.shape[1])
        rope = self.rotary(hidden, positions)
        with decode_attention(self.device):
            if self.lean is not None:
                for layer in self.lean[lo:hi]:
                    hidden = layer(hidden, rope, mask, cache)
                return hidden
            for layer in self.layers[lo:hi]:
                hidden = layer(hidden, attention_mask=mask, position_ids=positions, use_cache=True,
                               position_embeddings=rope, **cache_arg(layer, cache))
            return hidden

    def trunk(self, token_ids: torch.Tensor, start: int | Block, cache: BatchKVCache) -> torch.Tensor:
        """token ids [n] (one row) or [B, n] -> layer-k hidden [B, n, d]."""
        ids = token_ids if token_ids.dim() == 2 else token_ids[None]
        return self._run(self.embed(ids), 0, self.exit_layer, start, cache)

    def verify(self, hidden: torch.Tensor, start: int | Block, cache: BatchKVCache,
               last: int | None = None) -> torch.Tensor:
        """layer-k hidden [B, n, d] -> full-model logits (float32): [n, V] for one row, [B, n, V] for a Block.
        With `last`, only each row's last `last` own tokens' ([last, V], [B, last, V]): a prefill needs
        nothing more, and the lm_head is a fifth of SmolLM2's arithmetic."""
        out = self._run(hidden, self.exit_layer, self.num_layers, start, cache)
        if last is not None:
            out = last_tokens(out, Block.of(start, hidden.shape[1]).counts, last)
        logits = self.lm_head(self.norm(out)).float()
        return logits if isinstance(start, Block) else logits[0]

    def head_logits(self, head, hidden: torch.Tensor, start: int, head_cache) -> torch.Tensor:
        """A drafting step of `head` (DrafterHead.next_logits): here eager, captured in
        selfspec.passes.StaticPasses, whose passes the engine calls by these same names."""
        return head.next_logits(hidden, start, head_cache)


def last_tokens(hidden: torch.Tensor, counts: tuple[int, ...], last: int) -> torch.Tensor:
    """Each row's last `last` own tokens of hidden [B, n, d], its first `counts[b]` ([B, last, d]); a row with
    fewer than `last` repeats its first token in front."""
    n = hidden.shape[1]
    last = min(last, n)
    if all(c == n for c in counts):
        return hidden[:, n - last:]
    index = torch.tensor([[max(c - last + j, 0) for j in range(last)] for c in counts], device=hidden.device)
    return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[2]))
