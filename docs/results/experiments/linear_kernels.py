"""Which CPU kernel makes SmolLM2's few-row linear products fastest on this machine: the script behind
"Which few-row kernel" in docs/benchmarks.md.

Runs all 211 weight matrices of one decoding pass (30 layers' projections and lm_head, 538 MB, too
much for any cache, so every product streams its weight from memory as decoding does) on m rows, three
ways, medians of 5 passes after a warm-up:
- F.linear: PyTorch's own (MKL) path, what transformers runs;
- thin GEMM: (W·xᵀ)ᵀ with a column-major right-hand side of >= 2 columns (selfspec/small_batch_linear.py);
- oneDNN packed: the weights reordered once into oneDNN's blocked layout (a second copy, 538 MB) and
  run with `torch.ops.mkldnn._linear_pointwise`, as Inductor's CPU freezing does (not built).
Then the whole-pass choice `SplitModel` makes on this machine (`selfspec.step_costs.measure_thin_rows`).

    python docs/results/experiments/linear_kernels.py
"""
import statistics
import time

import torch
import torch.nn.functional as F

from selfspec.model import load_model
from selfspec.small_batch_linear import small_batch_linear
from selfspec.split import SplitModel

ROWS = (1, 2, 3, 4, 5, 8, 9)


def pass_ms(products, reps: int = 5) -> float:
    samples = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        products()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples[1:]) * 1e3


def main():
    torch.set_num_threads(2)
    model, _ = load_model()
    weights = [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    weights.append(model.lm_head.weight)
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 4) for w in weights]
    pointwise = torch.ops.mkldnn._linear_pointwise
    print(f"{len(weights)} products, {sum(w.numel() * w.element_size() for w in weights) / 1e6:.0f} MB of weights")
    print("| rows | F.linear (ms) | thin GEMM (ms) | oneDNN packed (ms) |\n|---|---|---|---|")
    with torch.inference_mode():
        for m in ROWS:
            x = {w.shape[1]: torch.randn(m, w.shape[1]) for w in weights}
            ms = [pass_ms(lambda: [F.linear(x[w.shape[1]], w) for w in weights]),
                  pass_ms(lambda: [small_batch_linear(x[w.shape[1]], w) for w in weights]),
                  pass_ms(lambda: [pointwise(x[w.shape[1]], p, None, "none", [], "") for w, p in zip(weights, packed)])]
            print(f"| {m} | {ms[0]:.1f} | {ms[1]:.1f} | {ms[2]:.1f} |", flush=True)
    thin = sorted(SplitModel(model, 4).thin_rows)
    print("SplitModel runs the thin GEMM for rows:", f"{thin[0]}-{thin[-1]}" if thin else "none (F.linear for all)")


if __name__ == "__main__":
    main()
