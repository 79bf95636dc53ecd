"""A preallocated per-layer KV cache whose layers can hold different lengths.

Drafting advances the trunk layers [0,k) one token at a time while the verifier layers [k,L) lag
behind until verification, so each layer keeps its own length. Rolling back after a rejection is
just lowering the lengths: no copies, no reallocation.
"""
from __future__ import annotations

import functools
import inspect

import torch


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, 1, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * num_layers
        self.capacity = capacity

    @classmethod
    def for_model(cls, config, capacity: int, dtype: torch.dtype, device) -> "KVCache":
        return cls(*_model_dims(config), capacity, dtype, device)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_, **__):
        """Called by the HF attention module: append [1, heads, n, dim] and return the layer's whole K, V.
        Transformers also passes cache kwargs (positionally before 5.x, as `kwargs=` after); a plain
        full-attention cache needs none of them."""
        start = self.lengths[layer_idx]
        end = start + key.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} > capacity {self.capacity}")
        self.keys[layer_idx, :, :, start:end] = key
        self.values[layer_idx, :, :, start:end] = value
        self.lengths[layer_idx] = end
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def length(self, layer_idx: int) -> int:
        return self.lengths[layer_idx]

    def seek(self, length: int) -> None:
        """Set every layer's length: backward forgets, forward leaves a hole of stale entries that only
        a caller who never attends there may leave (a windowed head jumping over positions it skipped)."""
        if not 0 <= length <= self.capacity:
            raise RuntimeError(f"KV cache seek to {length} outside [0, {self.capacity}]")
        self.lengths = [length] * len(self.lengths)

    def crop(self, length: int) -> None:
        """Forget every position >= length in every layer (rejected drafts)."""
        self.lengths = [min(n, length) for n in self.lengths]


class StaticKVCache:
    """The split's cache for passes captured as CUDA graphs: a block's positions live in a device tensor
    (`start`, which the caller sets before a pass) and attention always covers the whole capacity, masked
    by position. Nothing a pass does depends on Python-side lengths, so one captured graph serves every
    position, and forgetting rejected drafts costs nothing: entries past a query's position are masked,
    then overwritten."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, 1, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.start = torch.zeros((), dtype=torch.long, device=device)
        self.key_positions = torch.arange(capacity, device=device)
        self._block = self.key_positions[:0]

    @classmethod
    def for_model(cls, config, capacity: int, dtype: torch.dtype, device) -> "StaticKVCache":
        return cls(*_model_dims(config), capacity, dtype, device)

    def place(self, start: int | torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [1, n] of a block of n tokens from `start` (an int, or this cache's own `start`
        tensor, which a captured graph reads when replayed) and the keys each may see [1, 1, n, capacity]."""
        if not isinstance(start, torch.Tensor):
            if start + n > self.capacity:
                raise RuntimeError(f"KV cache overflow: {start + n} > capacity {self.capacity}")
            self.start.fill_(start)
        self._block = self.start + self.key_positions[:n]
        return self._block[None], (self.key_positions[None, :] <= self._block[:, None])[None, None]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_, **__):
        """Write [1, heads, n, dim] at the placed block's positions; return the layer's whole K, V."""
        self.keys[layer_idx].index_copy_(2, self._block, key)
        self.values[layer_idx].index_copy_(2, self._block, value)
        return self.keys[layer_idx], self.values[layer_idx]

    def crop(self, length: int) -> None:
        """Nothing to do: a later query at position < length masks what lies beyond it."""


def _model_dims(config) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of an HF decoder config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, head_dim


@functools.cache
def _cache_arg_name(layer_type: type) -> str:
    params = inspect.signature(layer_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_arg(layer, cache: KVCache | None) -> dict:
    """The keyword under which `layer` takes its cache: transformers 5.x renames a decoder layer's
    `past_key_values` to `cache` (the old name warns, then goes in 5.40)."""
    return {_cache_arg_name(type(layer)): cache}
