"""Linear layers for the 1-8 rows decoding feeds them, with the CPU kernel that is faster on this machine.

`F.linear` computes x·Wᵀ. For a handful of rows MKL then takes a matrix-vector or small-M path
whose speed depends on the CPU. On the 2-core AMD EPYC (AVX2) and the first AVX-512 machine it
streamed W at well under the memory bandwidth: SmolLM2's linears cost 30 ms for one row and 51 / 62
ms for two / three, against 15 / 14 / 20 ms when the same product is computed as (W·xᵀ)ᵀ, which MKL
runs as a GEMM with a thin right-hand side (one row is duplicated into two, since a single column
falls back to the slow matrix-vector path). On a 2-core Intel Xeon (AVX-512) it is the other way
round: a one-token pass costs 30 ms with F.linear and 67 ms with the thin GEMM. So the choice is
measured, per row count, on the running machine (`selfspec.split.SplitModel`), and the row counts
where the thin GEMM wins are passed here as `thin_rows`. Above `SMALL_BATCH` rows (prefill,
training) and on other devices, `F.linear` is used as is.

The results equal `F.linear`'s up to float rounding (|Δ| ~ 1e-5 on SmolLM2's logits), of the same
size as the differences between F.linear's own kernels for different row counts.
"""
from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import nn

SMALL_BATCH = 128  # measured on the AMD machine: above this F.linear wins again
ALL_ROWS = frozenset(range(1, SMALL_BATCH + 1))


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       thin_rows=ALL_ROWS) -> torch.Tensor:
    """F.linear(x, weight, bias), computed as (W·xᵀ)ᵀ on CPU when x has a row count in `thin_rows`."""
    rows = x.numel() // x.shape[-1]
    if not x.is_cpu or rows not in thin_rows:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    # MKL picks its fast thin-GEMM path only for a column-major right-hand side of >= 2 columns
    flat = flat.expand(2, -1).contiguous() if rows == 1 else flat.contiguous()
    out = torch.mm(weight, flat.t())[:, :rows].t().contiguous()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class SmallBatchLinear(nn.Linear):
    """An nn.Linear (same parameters, same state-dict keys) with the small-batch CPU product for the
    row counts in `thin_rows`, which `use_small_batch_linears` sets."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return small_batch_linear(x, self.weight, self.bias, self.thin_rows)


def use_small_batch_linears(module: nn.Module, thin_rows=ALL_ROWS) -> nn.Module:
    """Turn every plain nn.Linear inside `module` into a SmallBatchLinear that uses the thin GEMM for
    `thin_rows` (a set the caller may update later: it is shared, not copied), in place. Only the
    class changes (no parameters or buffers), so hooks and state-dict keys are kept."""
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = SmallBatchLinear
        if type(sub) is SmallBatchLinear:
            sub.thin_rows = thin_rows
    return module


def small_batch_copy(module: nn.Module, thin_rows=ALL_ROWS) -> nn.Module:
    """A copy of `module` that shares its parameters and buffers (no memory is copied) and runs its
    linear layers as SmallBatchLinear, leaving `module` itself as it was."""
    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return use_small_batch_linears(copy.deepcopy(module, shared), thin_rows)
