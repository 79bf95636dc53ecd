"""Measure on the running machine what a trunk step, a head call and verifying m tokens cost, for one
sequence and for batches of them, and which CPU kernel makes a few-row pass faster.

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
from selfspec.kv_cache import Block
from selfspec.small_batch_linear import ALL_ROWS, SMALL_BATCH

CALIBRATED_ROWS = 9  # a decoding pass carries 1 to γ+1 rows, and γ <= 8 covers every measured setting


@dataclass
class PassCosts:
    """Seconds of whole passes over `batch` sequences at once (measure_pass_costs below)."""

    trunk: float  # one token per sequence through layers [0, k)
    head: float  # one drafter-head call for every sequence
    verify: list[float]  # verify[m]: m tokens per sequence through layers [k, L) + norm + lm_head (index 0 unused)
    trunk_block: list[float] | None = None  # trunk_block[m]: m tokens per sequence through layers [0, k) in one pass
    batch: int = 1

    def round_time(self, n_drafts: int, n_heads: int) -> float:
        """A sequence's share of a round in which every sequence drafts n_drafts with the head."""
        return (self.trunk * (1 + n_drafts) + self.head * n_heads + self.verify[n_drafts + 1]) / self.batch

    def copy_round_time(self, n_drafts: int) -> float:
        """A sequence's share of a round of copied drafts: pending + drafts through the trunk at once, then
        verified."""
        block = self.trunk_block[n_drafts + 1] if self.trunk_block else self.trunk * (1 + n_drafts)
        return (block + self.verify[n_drafts + 1]) / self.batch


@dataclass
class CostTable:
    """PassCosts measured at a few batch sizes; `at(B)` interpolates between them (linearly in B) and, past
    the largest, keeps its cost per sequence. A batch of B sequences pads every sequence's block to the widest
    one, so a round's time is a function of B and the width: what a batch-aware policy weighs."""

    by_batch: dict[int, PassCosts]

    def __post_init__(self):
        if 1 not in self.by_batch:
            raise ValueError("a cost table needs the costs at batch 1")
        self._at: dict[int, PassCosts] = {}

    @classmethod
    def of(cls, costs: "PassCosts | CostTable") -> "CostTable":
        return costs if isinstance(costs, CostTable) else cls({costs.batch: costs})

    @property
    def widths(self) -> int:
        """How many block widths every measured batch size has (verify[1..widths])."""
        return min(len(c.verify) for c in self.by_batch.values()) - 1

    def at(self, batch: int) -> PassCosts:
        if batch not in self._at:
            self._at[batch] = self._interpolate(batch)
        return self._at[batch]

    def _interpolate(self, batch: int) -> PassCosts:
        sizes = sorted(self.by_batch)
        if batch in self.by_batch:
            return self.by_batch[batch]
        lo = max((b for b in sizes if b < batch), default=sizes[0])
        hi = min((b for b in sizes if b > batch), default=None)
        if hi is None:  # past the largest measured: the same cost per sequence
            return _scaled(self.by_batch[lo], batch / lo, batch)
        w = (batch - lo) / (hi - lo)
        a, b = self.by_batch[lo], self.by_batch[hi]
        mix = lambda x, y: (1 - w) * x + w * y  # noqa: E731
        block = ([mix(x, y) for x, y in zip(a.trunk_block, b.trunk_block)]
                 if a.trunk_block and b.trunk_block else None)
        return PassCosts(mix(a.trunk, b.trunk), mix(a.head, b.head), [mix(x, y) for x, y in zip(a.verify, b.verify)],
                         block, batch)


def _scaled(costs: PassCosts, factor: float, batch: int) -> PassCosts:
    return PassCosts(costs.trunk * factor, costs.head * factor, [v * factor for v in costs.verify],
                     [t * factor for t in costs.trunk_block] if costs.trunk_block else None, batch)


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
def measure_pass_costs(passes, head, max_drafts: int, batch_sizes=(1,), context: int = 128,
                       reps: int = 5) -> CostTable:
    """`passes`: what will run the passes (a SplitModel, or selfspec.passes.StaticPasses, whose CUDA
    graphs cost a fraction of eager passes); `batch_sizes`: the batches to time (1 is always among them)."""
    sizes = sorted({1, *batch_sizes})
    cache = passes.new_cache(context + max_drafts + 2, sizes[-1])
    ids = _probe_ids(passes, context + max_drafts + 1)
    passes.verify(passes.trunk(ids[:context], 0, cache), 0, cache)
    for slot in range(1, sizes[-1]):  # every slot holds the same context
        cache.move(0, slot, context)
    probe = _Probe(passes, head, cache, ids[context:], context, reps)
    return CostTable({b: probe.costs(b) for b in sizes})


@dataclass
class _Probe:
    """What timing the passes at one batch size needs: a cache whose slots hold `context` positions, and the
    tokens after them."""
    passes: object
    head: object
    cache: object
    tokens: torch.Tensor  # max_drafts + 1 ids: the widest block
    context: int
    reps: int

    def costs(self, batch: int) -> PassCosts:
        """The passes' costs for `batch` sequences: each timed pass writes past the context only, where
        the next one writes again."""
        passes, head, cache, context, reps = self.passes, self.head, self.cache, self.context, self.reps

        def block(m: int) -> Block:
            return Block((context,) * batch, (m,) * batch)

        rows = self.tokens.expand(batch, -1)
        hidden = passes.trunk(rows[:, :1], block(1), cache)
        device = passes.device
        trunk = _median_seconds(lambda: passes.trunk(rows[:, :1], block(1), cache), reps, device)
        head_cost = float("inf")
        if head is not None:
            head_cache = head.new_cache(context + 1)
            if head.attends:  # an attention head runs a row at a time, on its own cache
                head_cost = batch * _median_seconds(lambda: passes.head_logits(head, hidden[:1], context, head_cache),
                                                    reps, device)
            else:
                head_cost = _median_seconds(lambda: passes.head_logits(head, hidden, context, head_cache), reps, device)
        widths = range(1, len(self.tokens) + 1)
        verify = [0.0] + [_median_seconds(lambda m=m: passes.verify(hidden.expand(-1, m, -1), block(m), cache), reps,
                                          device) for m in widths]
        trunk_block = [0.0] + [_median_seconds(lambda m=m: passes.trunk(rows[:, :m], block(m), cache), reps, device)
                               for m in widths]
        return PassCosts(trunk=trunk, head=head_cost, verify=verify, trunk_block=trunk_block, batch=batch)


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
