"""Preallocated KV caches: the decoder's, a slot per sequence of the batch, masked by position (eager:
BatchKVCache; captured as CUDA graphs: StaticKVCache), and the drafter head's own (KVCache).

Drafting advances the trunk layers [0,k) ahead of the verifier layers [k,L), and a rejection rolls a
sequence back: both are free when attention is masked by position rather than by a length, as vLLM's paged
attention and gpt-fast's static cache do. Padding a ragged block must never zero a key that a query still
sees (a zero key still adds to the softmax): padding rows write nothing (eager) or write past the row's
position, where a later pass overwrites them before any query reaches them (static).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch


class KVCache:
    """The drafter head's own cache (attention heads): one sequence, per-layer lengths, attention over exactly
    the filled part."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, 1, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * num_layers
        self.capacity = capacity

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


@dataclass(frozen=True)
class Block:
    """The rows of one pass: row b is the sequence in slot `first_slot + b`, its tokens at positions
    starts[b], starts[b] + 1, ...; counts[b] of them are its own, the rest of the block's width padding."""
    starts: tuple[int, ...]
    counts: tuple[int, ...]
    first_slot: int = 0

    @classmethod
    def of(cls, start, n: int) -> "Block":
        """A pass's `start` argument as a Block: a Block as is, an int one row of n tokens in slot 0."""
        return start if isinstance(start, Block) else cls((int(start),), (n,))

    @property
    def rows(self) -> int:
        return len(self.starts)


class BatchKVCache:
    """The decoder's cache: a slot per sequence in the batch, [layers, slots, KV heads, capacity, dim].

    Nothing tracks lengths: a query at position p attends the keys at positions <= p of its own slot, so a
    rejected draft is forgotten by moving the sequence's position back (its entries are masked, then
    overwritten), and the trunk may run ahead of the verifier layers. A pass of B rows uses slots
    [first_slot, first_slot + B) as a view: the decoder keeps its sequences in the first slots. Attention
    covers positions up to the block's furthest one; for one row the mask is the plain causal one (none for a
    single token), so a batch of one computes what a one-sequence cache does."""

    def __init__(self, config, capacity: int, dtype: torch.dtype, device, slots: int = 1):
        """For an HF decoder `config`: `slots` sequences of `capacity` positions."""
        self.keys, self.values = _slots(config, capacity, dtype, device, slots)
        self._block, self._end, self._writes = Block((0,), (0,)), 0, None

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def slots(self) -> int:
        return self.keys.shape[1]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (a sequence changing slots)."""
        self.keys[:, dst, :, :length] = self.keys[:, src, :, :length]
        self.values[:, dst, :, :length] = self.values[:, src, :, :length]

    def place(self, block: Block, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions [B, n] of a block n tokens wide and the keys each may see ([B, 1, n, end] or None)."""
        device = self.keys.device
        starts = torch.tensor(block.starts, device=device)
        positions = starts[:, None] + torch.arange(n, device=device)[None]
        self._end = max(block.starts) + n
        if self._end > self.capacity or block.first_slot + block.rows > self.slots:
            raise RuntimeError(f"KV cache overflow: a block to position {self._end} in slots "
                               f"{block.first_slot}..{block.first_slot + block.rows - 1}, the cache has "
                               f"{self.slots} slots of {self.capacity}")
        self._block = block
        self._writes = None
        if any(c != n for c in block.counts):  # padding rows write nothing: only their own tokens
            rows = [b for b, c in enumerate(block.counts) for _ in range(c)]
            cols = [j for c in block.counts for j in range(c)]
            self._writes = (torch.tensor(rows, device=device), torch.tensor(cols, device=device),
                            positions[rows, cols] if rows else positions[:0, 0])
        if block.rows == 1 and n == 1:
            return positions, None
        keys = torch.arange(self._end, device=device)
        return positions, (keys[None, None, :] <= positions[:, :, None])[:, None]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_, **__):
        """Write the placed block's [B, heads, n, dim]; return its slots' K, V up to the block's end."""
        b0, block = self._block.first_slot, self._block
        keys, values = self.keys[layer_idx, b0:b0 + block.rows], self.values[layer_idx, b0:b0 + block.rows]
        if self._writes is None and block.rows == 1:
            start = block.starts[0]
            keys[0, :, start:start + key.shape[2]] = key[0]
            values[0, :, start:start + key.shape[2]] = value[0]
        else:
            rows, cols, positions = self._writes if self._writes is not None else self._all_writes(key.shape[2])
            keys[rows, :, positions] = key.transpose(1, 2)[rows, cols]
            values[rows, :, positions] = value.transpose(1, 2)[rows, cols]
        return keys[:, :, :self._end], values[:, :, :self._end]

    def _all_writes(self, n: int):
        device, block = self.keys.device, self._block
        rows = torch.arange(block.rows, device=device).repeat_interleave(n)
        cols = torch.arange(n, device=device).repeat(block.rows)
        positions = torch.tensor(block.starts, device=device).repeat_interleave(n) + cols
        self._writes = (rows, cols, positions)
        return self._writes

    def crop(self, length: int) -> None:
        """Nothing to do: a later query at position < length masks what lies beyond it."""


class StaticKVCache:
    """The cache for passes captured as CUDA graphs: each slot's block start lives in a device tensor
    (`starts`, which the caller sets before a pass), attention always covers the whole capacity, masked by
    position, and a block writes all its n positions (padding too, beyond a row's own tokens, where later
    passes overwrite it before anything attends there). Nothing a pass does depends on Python-side values,
    so one captured graph serves every position, and forgetting rejected drafts costs nothing."""

    def __init__(self, config, capacity: int, dtype: torch.dtype, device, slots: int = 1):
        """For an HF decoder `config`: `slots` sequences of `capacity` positions."""
        self.keys, self.values = _slots(config, capacity, dtype, device, slots)
        self.capacity, self.slots = capacity, slots
        self.starts = torch.zeros(slots, dtype=torch.long, device=device)
        self.key_positions = torch.arange(capacity, device=device)
        self._positions, self._rows = self.key_positions[None, :0], slice(0, 1)

    move = BatchKVCache.move

    def set_starts(self, block: Block, n: int) -> None:
        """Check the room for a block n wide and put its starts where the pass (or its graph) reads them."""
        end = max(block.starts) + n
        if end > self.capacity or block.first_slot + block.rows > self.slots:
            raise RuntimeError(f"KV cache overflow: a block to position {end} in slots {block.first_slot}.."
                               f"{block.first_slot + block.rows - 1}, the cache has {self.slots} slots of {self.capacity}")
        rows = slice(block.first_slot, block.first_slot + block.rows)
        self.starts[rows].copy_(torch.tensor(block.starts))

    def place(self, block: Block, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [B, n] of the block from `starts` (set before, see set_starts) and the keys each may
        see [B, 1, n, capacity]."""
        self._rows = slice(block.first_slot, block.first_slot + block.rows)
        self._positions = self.starts[self._rows, None] + self.key_positions[None, :n]
        return self._positions, (self.key_positions[None, None, :] <= self._positions[:, :, None])[:, None]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_, **__):
        """Write [B, heads, n, dim] at the placed block's positions; return its slots' whole K, V."""
        index = self._positions[:, None, :, None].expand_as(key)
        keys, values = self.keys[layer_idx, self._rows], self.values[layer_idx, self._rows]
        keys.scatter_(2, index, key)
        values.scatter_(2, index, value)
        return keys, values

    def crop(self, length: int) -> None:
        """Nothing to do: a later query at position < length masks what lies beyond it."""


def carry(old, new) -> None:
    """Copy what a smaller decoder cache holds into the same slots and positions of a larger one."""
    _, slots, _, capacity, _ = old.keys.shape
    new.keys[:, :slots, :, :capacity] = old.keys
    new.values[:, :slots, :, :capacity] = old.values


def _slots(config, capacity: int, dtype: torch.dtype, device, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed keys and values [layers, slots, KV heads, capacity, head dim] for an HF decoder config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (config.num_hidden_layers, slots, config.num_key_value_heads, capacity, head_dim)
    return (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))


@functools.cache
def _cache_arg_name(layer_type: type) -> str:
    params = inspect.signature(layer_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_arg(layer, cache: KVCache | None) -> dict:
    """The keyword under which `layer` takes its cache: transformers 5.x renames a decoder layer's
    `past_key_values` to `cache` (the old name warns, then goes in 5.40)."""
    return {_cache_arg_name(type(layer)): cache}
