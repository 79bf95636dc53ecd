"""What SmolLM2's passes cost as the batch grows: the script behind "What a batch costs" in
docs/benchmarks.md.

1. A decoding step: one token per sequence through the whole model (`trunk` then `verify`, the passes a
   γ=0 round runs) for B sequences, each 500 positions into its context, and what the same step costs with
   attention over no context (the weights' products alone, nearly).
2. A prefill: prompts of 8, 64 and 400 tokens, one pass each, against B = 4 of them in one pass (what
   `join_all` runs), with logits for every position against the last one only (what a prefill keeps).
3. The arithmetic rate of the product a step's linears run on B rows (the thin GEMM: W [46,080 x 576],
   SmolLM2's 30 gate projections stacked, times B columns), against a large square product.

Medians of 15 (steps) or 5 (prefills) passes after a warm-up, float32, 2 threads.

    python docs/results/experiments/batch_pass_cost.py
"""
import statistics
import time

import torch

from selfspec.kv_cache import Block
from selfspec.model import load_model
from selfspec.split import SplitModel


def median_ms(fn, reps: int) -> float:
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def step_ms(split: SplitModel, rows: int, context: int) -> float:
    cache = split.new_cache(context + 8, rows)
    ids = torch.randint(100, 1000, (rows, 1))
    block = Block((context,) * rows, (1,) * rows)
    return median_ms(lambda: split.verify(split.trunk(ids, block, cache), block, cache), 15)


def prefill_ms(split: SplitModel, rows: int, length: int, last: int | None) -> float:
    cache = split.new_cache(length + 8, rows)
    ids = torch.randint(100, 1000, (rows, length))
    block = Block((0,) * rows, (length,) * rows)
    return median_ms(lambda: split.verify(split.trunk(ids, block, cache), block, cache, last), 5)


def gemm_gflops(rows: int, columns: int, inner: int) -> float:
    a, b = torch.randn(rows, inner), torch.randn(columns, inner).t()
    return 2 * rows * columns * inner / median_ms(lambda: a @ b, 10) / 1e6


def main():
    torch.set_num_threads(2)
    split = SplitModel(load_model()[0], 4)
    with torch.inference_mode():
        one = step_ms(split, 1, 500)
        print("decoding step, one token per sequence at position 500 (no context: attention over 1 position)")
        print("| B | ms | ms, no context | x B=1 | tokens/s |")
        print("|---|---|---|---|---|")
        for rows in (1, 2, 4, 8, 16):
            ms = one if rows == 1 else step_ms(split, rows, 500)
            print(f"| {rows} | {ms:.1f} | {step_ms(split, rows, 0):.1f} | {ms / one:.2f} | {rows / ms * 1e3:.1f} |")
        print("\nprefill, ms: one prompt (all logits, last only), and 4 prompts in one pass (last only) "
              "against 4 passes")
        print("| tokens | 1 prompt, all logits | 1 prompt, last logits | 4 in one pass | 4 passes |")
        print("|---|---|---|---|---|")
        for length in (8, 64, 400):
            whole, last = prefill_ms(split, 1, length, None), prefill_ms(split, 1, length, 1)
            print(f"| {length} | {whole:.0f} | {last:.0f} | {prefill_ms(split, 4, length, 1):.0f} | {4 * last:.0f} |")
    print("\nGFLOP/s: thin GEMM [46080 x 576] x [576 x B]; square 2048^3:",
          ", ".join(f"B={b} {gemm_gflops(46080, b, 576):.0f}" for b in (2, 4, 8, 16)),
          f"; square {gemm_gflops(2048, 2048, 2048):.0f}")


if __name__ == "__main__":
    main()
