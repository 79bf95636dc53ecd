"""Measure what a trunk step, a head call and verifying m tokens cost on the running machine.

The cost-aware length policy needs these because they are uneven and machine-specific: on the
2-core CPU verifying 2 tokens costs what 1 does, and 3 or 7 cost more than 4 or 8 (GEMM shapes).
"""
from __future__ import annotations

import statistics
import time

import torch

from selfspec.length_policy import StepCosts


def _median_seconds(fn, reps: int) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@torch.inference_mode()
def measure_step_costs(split, head, max_drafts: int, context: int = 128, reps: int = 5) -> StepCosts:
    cache = split.new_cache(context + max_drafts + 2)
    ids = torch.randint(0, split.config.vocab_size, (context + 1,), device=split.device)
    split.verify(split.trunk(ids[:context], 0, cache), 0, cache)
    hidden = split.trunk(ids[context:], context, cache)
    cache.crop(context)

    def trunk_step():
        split.trunk(ids[context:], context, cache)
        cache.crop(context)

    def trunk_block_step(m: int):
        split.trunk(ids[context - m + 1:context + 1], context, cache)
        cache.crop(context)

    def verify_step(m: int):
        split.verify(hidden.expand(1, m, -1), context, cache)
        cache.crop(context)

    trunk = _median_seconds(trunk_step, reps)
    head_cost = float("inf")
    if head is not None:
        head_cache = head.new_cache(context + 1)
        head_cost = _median_seconds(lambda: head.next_logits(hidden, context, head_cache), reps)
    verify = [0.0] + [_median_seconds(lambda m=m: verify_step(m), reps) for m in range(1, max_drafts + 2)]
    block = [0.0] + [_median_seconds(lambda m=m: trunk_block_step(m), reps) for m in range(1, max_drafts + 2)]
    return StepCosts(trunk=trunk, head=head_cost, verify=verify, trunk_block=block)
