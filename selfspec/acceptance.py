"""The verification rules. Both keep decoding lossless: greedy reproduces the model's argmax path,
sampling reproduces the model's sampling distribution (Leviathan et al. 2023, Chen et al. 2023)."""
from __future__ import annotations

from typing import Iterable

import torch


def greedy_accept(drafts: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """drafts [n], target_logits [n+1, V] -> (accepted prefix length, the verifier's next token)."""
    choice = target_logits.argmax(-1)
    n = drafts.numel()
    mismatch = (drafts != choice[:n].cpu()).nonzero()
    n_acc = int(mismatch[0]) if mismatch.numel() else n
    return n_acc, int(choice[n_acc])


def sampling_accept(drafts: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor,
                    generator: torch.Generator | None) -> tuple[int, int]:
    """Speculative sampling. q [n, V] draft probs, p [n+1, V] target probs (same temperature).

    Draft i is accepted with probability min(1, p_i(x)/q_i(x)); on the first reject the token is
    resampled from normalise(max(0, p_i - q_i)); if all are accepted the bonus token comes from p_n.
    """
    n = drafts.numel()
    for i in range(n):
        x = int(drafts[i])
        ratio = float(p[i, x] / q[i, x]) if q[i, x] > 0 else 0.0
        if torch.rand((), generator=generator, dtype=torch.float64, device=p.device) < ratio:
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        total = residual.sum()
        # total == 0 only if p == q, where the ratio is 1 and we cannot reach here; guard anyway.
        residual = residual / total if total > 0 else p[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return n, int(torch.multinomial(p[n], 1, generator=generator))


def mean_accepted_length(accepted_per_round: Iterable[int]) -> float:
    """Tokens committed per verification round: accepted drafts + the verifier's own token (1.0 for
    no rounds, which is plain decoding)."""
    counts = list(accepted_per_round)
    return sum(counts) / len(counts) + 1 if counts else 1.0
