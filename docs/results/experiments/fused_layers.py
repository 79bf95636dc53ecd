"""What a decoding pass costs, and what lean layers and fused projections take off it. The script behind
"What a pass costs" in docs/learning.md.

Times one pass (m new tokens through all 30 layers, norm and lm_head, 256 cached positions) three
ways, interleaved so that the machine's drift hits all alike:
- hf: SplitModel(lean=False), Hugging Face's own decoder layers with SmallBatchLinear projections;
- lean: SplitModel as built (selfspec.lean_layers);
- fused: lean, with q/k/v fused into one weight and gate/up into another, gpt-fast style (5 products a
  layer instead of 7; needs a second copy of those weights, so it is not built).
Then profiles the lean one-token pass to show what share is matrix products.

    python docs/results/experiments/fused_layers.py
"""
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from selfspec.lean_layers import LeanLlamaLayer
from selfspec.model import load_model
from selfspec.split import SplitModel

CONTEXT = 256


class FusedLayer(LeanLlamaLayer):
    def __init__(self, layer, thin_rows):
        super().__init__(layer, thin_rows)
        self.qkv = torch.cat([self.q, self.k, self.v]).contiguous()
        self.gate_up = torch.cat([self.gate, self.up]).contiguous()
        self.sizes, self.inter = [self.q.shape[0], self.k.shape[0], self.v.shape[0]], self.gate.shape[0]

    def __call__(self, hidden, rope, mask, cache):
        b, n, _ = hidden.shape
        q, k, v = (t.reshape(b, n, -1, self.head_dim).transpose(1, 2)
                   for t in self._linear(self.norm_attn(hidden), self.qkv).split(self.sizes, -1))
        q, k = self.rope(q, k, *rope)
        keys, values = cache.update(k, v, self.index)
        hidden = hidden + self._linear(self._attention(q, keys, values, mask), self.o)
        gate_up = self._linear(self.norm_mlp(hidden), self.gate_up)
        return hidden + self._linear(F.silu(gate_up[..., :self.inter]) * gate_up[..., self.inter:], self.down)


def main():
    torch.set_num_threads(2)
    model, _ = load_model()
    splits = {"hf": SplitModel(model, 4, lean=False), "lean": SplitModel(model, 4), "fused": SplitModel(model, 4)}
    splits["fused"].lean = [FusedLayer(layer, splits["fused"].thin_rows) for layer in splits["fused"].layers]
    ids = torch.randint(0, model.config.vocab_size, (CONTEXT + 8,))
    caches = {name: split.new_cache(CONTEXT + 16) for name, split in splits.items()}

    def step(name, m):
        split, cache = splits[name], caches[name]
        logits = split.verify(split.trunk(ids[CONTEXT:CONTEXT + m], CONTEXT, cache), CONTEXT, cache)
        cache.crop(CONTEXT)
        return logits

    with torch.inference_mode():
        for name, split in splits.items():
            split.verify(split.trunk(ids[:CONTEXT], 0, caches[name]), 0, caches[name])
        print("| tokens | hf (ms) | lean (ms) | fused (ms) | max abs logit diff, lean vs hf |\n|---|---|---|---|---|")
        for m in (1, 2, 4, 5, 8):
            diff = (step("hf", m) - step("lean", m)).abs().max().item()
            times = {name: [] for name in splits}
            for _ in range(30):
                for name in times:
                    start = time.perf_counter()
                    step(name, m)
                    times[name].append(time.perf_counter() - start)
            ms = [statistics.median(times[name]) * 1e3 for name in splits]
            print(f"| {m} | {ms[0]:.1f} | {ms[1]:.1f} | {ms[2]:.1f} | {diff:.1e} |", flush=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                step("lean", 1)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key == "aten::mm")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: lm_head = embeddings
    print(f"lean one-token pass, profiled: {total / 10e3:.1f} ms of operators, {mm / total:.0%} in matrix products, "
          f"which stream {weights / 1e6:.0f} MB of weights at {weights / (mm / 10e6) / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
