"""Measure on the running machine what a trunk step, a head call and verifying m tokens cost, and
which CPU kernel makes a few-row pass faster.

The cost-aware length policy needs the costs because they are uneven and machine-specific: on the
2-core CPU verifying 2 tokens costs what 1 does, and 3 or 7 cost more than 4 or 8 (GEMM shapes).
The kernel choice is machine-specific too (selfspec/small_batch_linear.py): the thin GEMM halves a
one-token pass on one 2-core CPU and doubles it on another.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from selfspec.device import synchronize
from selfspec.small_batch_linear import ALL_ROWS, SMALL_BATCH

CALIBRATED_ROWS = 9  # a decoding pass carries 1 to γ+1 rows, and γ <= 8 covers every measured setting


@dataclass
class PassCosts:
    """Seconds, measured on the running machine (measure_pass_costs below)."""

    trunk: float  # one token through layers [0, k)
    head: float  # one drafter-head call
    verify: list[float]  # verify[m]: m tokens through layers [k, L) + norm + lm_head (index 0 unused)
    trunk_block: list[float] | None = None  # trunk_block[m]: m tokens through layers [0, k) in one pass

    def round_time(self, n_drafts: int, n_heads: int) -> float:
        return self.trunk * (1 + n_drafts) + self.head * n_heads + self.verify[n_drafts + 1]

    def copy_round_time(self, n_drafts: int) -> float:
        """A round of copied drafts: pending + drafts through the trunk at once, then verified."""
        block = self.trunk_block[n_drafts + 1] if self.trunk_block else self.trunk * (1 + n_drafts)
        return block + self.verify[n_drafts + 1]


def _probe_ids(split, n: int) -> torch.Tensor:
    """n token ids to time passes with, from a generator of their own: measuring must not move the
    global random state that seeded sampling and training rely on. `split`: a SplitModel or StaticPasses."""
    return torch.randint(0, split.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).to(split.device)


def _median_seconds(fn, reps: int, device: torch.device | None = None) -> float:
    """The median of `reps` timed calls, each waiting for the device's queued work (a no-op on the CPU)."""
    fn()  # warm-up: first calls allocate and pick kernels
    samples = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@torch.inference_mode()
def measure_pass_costs(passes, head, max_drafts: int, context: int = 128, reps: int = 5) -> PassCosts:
    """`passes`: what will run the passes (a SplitModel, or selfspec.passes.StaticPasses, whose CUDA
    graphs cost a fraction of eager passes)."""
    cache = passes.new_cache(context + max_drafts + 2)
    ids = _probe_ids(passes, context + 1)
    passes.verify(passes.trunk(ids[:context], 0, cache), 0, cache)
    hidden = passes.trunk(ids[context:], context, cache)
    cache.crop(context)

    def trunk_step():
        passes.trunk(ids[context:], context, cache)
        cache.crop(context)

    def trunk_block_step(m: int):
        passes.trunk(ids[context - m + 1:context + 1], context, cache)
        cache.crop(context)

    def verify_step(m: int):
        passes.verify(hidden.expand(1, m, -1), context, cache)
        cache.crop(context)

    device = passes.device
    trunk = _median_seconds(trunk_step, reps, device)
    head_cost = float("inf")
    if head is not None:
        head_cache = head.new_cache(context + 1)
        head_cost = _median_seconds(lambda: passes.head_logits(head, hidden, context, head_cache), reps, device)
    verify = [0.0] + [_median_seconds(lambda m=m: verify_step(m), reps, device) for m in range(1, max_drafts + 2)]
    block = [0.0] + [_median_seconds(lambda m=m: trunk_block_step(m), reps, device) for m in range(1, max_drafts + 2)]
    return PassCosts(trunk=trunk, head=head_cost, verify=verify, trunk_block=block)


@torch.inference_mode()
def measure_thin_rows(split, context: int = 64, reps: int = 3) -> frozenset[int]:
    """The row counts for which a whole pass (trunk + verify) is faster with the thin GEMM than with
    F.linear, each timed `reps` times, the two interleaved so that drift hits both alike. Row counts
    above CALIBRATED_ROWS follow the choice made at CALIBRATED_ROWS. The split's own choice is left as
    it was."""
    chosen = frozenset(split.thin_rows)
    cache = split.new_cache(context + CALIBRATED_ROWS)
    ids = _probe_ids(split, context + CALIBRATED_ROWS)
    split.verify(split.trunk(ids[:context], 0, cache), 0, cache)

    def timed_pass(m: int, thin: bool) -> float:
        split.thin_rows.add(m) if thin else split.thin_rows.discard(m)
        start = time.perf_counter()
        split.verify(split.trunk(ids[context:context + m], context, cache), context, cache)
        cache.crop(context)
        return time.perf_counter() - start

    faster = set()
    try:
        for m in range(1, CALIBRATED_ROWS + 1):
            timed_pass(m, True), timed_pass(m, False)  # warm-up: first calls allocate and pick kernels
            samples = [(timed_pass(m, True), timed_pass(m, False)) for _ in range(reps)]
            if statistics.median(t for t, _ in samples) < statistics.median(f for _, f in samples):
                faster.add(m)
    finally:
        split.use_thin_gemm_for(chosen)
    if CALIBRATED_ROWS in faster:
        faster.update(range(CALIBRATED_ROWS + 1, SMALL_BATCH + 1))
    return frozenset(faster)


def parse_rows(text: str) -> frozenset[int]:
    """`DVI_THIN_GEMM_ROWS`: "none", "all", or comma-separated row counts that run as a thin GEMM."""
    text = text.strip().lower()
    if text in ("", "none"):
        return frozenset()
    if text == "all":
        return ALL_ROWS
    try:
        return frozenset(int(r) for r in text.split(","))
    except ValueError:
        raise ValueError(f"DVI_THIN_GEMM_ROWS={text!r}: expected none, all, or row counts like 1,2,3") from None
