"""The static-position passes (selfspec.passes: what CUDA graphs replay), run eagerly on the CPU,
compute what the dynamic passes compute: the same logits up to float rounding along prefill, drafting,
verification and rollback, and token-identical greedy decoding over random prompts, policies and heads,
with the cache reused (and grown) across requests."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_model import make_head, make_length_policy, plain_greedy, plain_greedy_batch, tiny_llama

from selfspec.copy_sources import CopySources
from selfspec.passes import StaticPasses, pass_runner, passes_mode
from selfspec.engine import SelfSpecDecoder
from selfspec.kv_cache import Block, StaticKVCache
from selfspec.split import SplitModel

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


# prefill 9; drafting 3 one at a time; verify 4; reject 2 (roll back to 12); a block of 3 copied drafts over
# the rolled-back positions; verify them; one plain step
SCRIPT = [("trunk", 0, 9), ("verify", 0, 9), ("trunk", 9, 1), ("trunk", 10, 1), ("trunk", 11, 1),
          ("verify", 9, 3), ("crop", 11, 0), ("trunk", 11, 3), ("verify", 11, 3), ("crop", 13, 0),
          ("trunk", 13, 1), ("verify", 13, 1), ("trunk", 14, 1), ("verify", 14, 1)]


def run_script(passes, cache, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every pass's output along SCRIPT, on `passes` (a SplitModel or StaticPasses) and its cache."""
    hidden, out = {}, []
    for kind, start, n in SCRIPT:
        if kind == "crop":
            cache.crop(start)
        elif kind == "trunk":
            hidden[start] = passes.trunk(ids[start:start + n], start, cache)
            out.append(hidden[start])
        else:
            block = torch.cat([hidden[p] for p in sorted(hidden) if start <= p < start + n], 1)[:, :n]
            out.append(passes.verify(block, start, cache))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("lean", [True, False], ids=["lean", "hf_layers"])
def test_static_passes_equal_dynamic(dtype, lean):
    split = SplitModel(tiny_llama(max_positions=64).to(dtype), 2, lean=lean)
    static = StaticPasses(split, graphs=False)
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1))
    cache = static.new_cache(48)
    assert isinstance(cache, StaticKVCache) and cache.capacity == 64  # rounded up, within the model's positions
    with torch.inference_mode():
        dynamic = run_script(split, split.new_cache(48), ids)
        placed = run_script(static, cache, ids)
    for a, b in zip(dynamic, placed, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= TOL[dtype] * max(1.0, float(a.abs().max()))


@pytest.mark.parametrize("passes", ["eager", "static"])
def test_verify_of_the_last_tokens_is_those_rows_of_the_whole(passes):
    """verify(last=m), what a prefill asks for, gives each row's last m own tokens' logits of the whole pass
    (a ragged block: the rows' own tokens end at different widths; a row shorter than m repeats its first)."""
    split = SplitModel(tiny_llama(max_positions=64).to(torch.float64), 2)
    runner = pass_runner(split, passes)
    ids = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(2))
    block = Block((0, 0, 0), (7, 5, 2))
    with torch.inference_mode():
        hidden = runner.trunk(ids, block, runner.new_cache(16, 3))
        whole = runner.verify(hidden, block, runner.new_cache(16, 3))
        last = runner.verify(hidden, block, runner.new_cache(16, 3), last=3)
    assert last.shape == (3, 3, whole.shape[-1])
    for row, (count, index) in enumerate(zip(block.counts, ([4, 5, 6], [2, 3, 4], [0, 0, 1]))):
        assert torch.allclose(last[row], whole[row, index], atol=1e-12), count


SETTINGS = [  # (exit layer, gamma, policy, head noise, draft vocab, attention (layers, window), ngram)
    (2, 4, "fixed", 0.05, None, None, 0),
    (1, 5, "cost_aware", 0.05, 64, None, 1),
    (2, 4, "threshold", 0.0, None, (1, 3), 1),
]


@pytest.mark.parametrize("k,gamma,policy,noise,vocab,attention,ngram", SETTINGS)
def test_static_decoding_is_token_identical(k, gamma, policy, noise, vocab, attention, ngram):
    model = tiny_llama(max_positions=96)
    head = make_head(model, k, noise, vocab, attention=attention)
    split = SplitModel(model, k)
    static = StaticPasses(split, graphs=False)
    decoders = {"eager": SelfSpecDecoder(split, head, make_length_policy(policy, gamma), CopySources(ngram)),
                "static": SelfSpecDecoder(split, head, make_length_policy(policy, gamma), CopySources(ngram), passes=static)}
    assert decoders["eager"].passes is split
    rng = np.random.default_rng(k * 10 + gamma)
    requests = [(rng.integers(0, 256, int(rng.integers(1, 40))).tolist(), int(rng.integers(1, 40))) for _ in range(8)]
    references = plain_greedy_batch(model, [r[0] for r in requests], [r[1] for r in requests])
    capacities, drafted = set(), 0
    # short and long requests in turn: one static cache serves them all
    for (prompt, max_new), expected in zip(requests, references, strict=True):
        results = {name: d.generate(prompt, max_new_tokens=max_new, eos_ids=set()) for name, d in decoders.items()}
        assert results["eager"].tokens == expected
        assert results["static"].tokens == expected
        drafted += sum(r.drafted for r in results["static"].rounds)
        capacities.add(static.cache.capacity)
    assert drafted > 0
    assert capacities == {96}  # one cache for every request, bounded by the model's positions


def test_static_sampling_draws_what_eager_draws():
    """Seeded sampling in float64: the same probabilities (to rounding) and the same generator give the
    same tokens on both paths."""
    model = tiny_llama(seed=2, vocab=32)
    split = SplitModel(model, 2)
    head = make_head(model, 2, 0.05)
    eager = SelfSpecDecoder(split, head, make_length_policy("fixed", 3), CopySources(ngram=1))
    static = SelfSpecDecoder(split, head, make_length_policy("fixed", 3), CopySources(ngram=1),
                             passes=StaticPasses(split, graphs=False))
    for seed in range(4):
        a = eager.generate([5, 9, 2], max_new_tokens=24, temperature=0.9, seed=seed, eos_ids=set()).tokens
        b = static.generate([5, 9, 2], max_new_tokens=24, temperature=0.9, seed=seed, eos_ids=set()).tokens
        assert a == b


def test_cache_grows_and_keeps_working():
    model = tiny_llama(max_positions=600)
    split = SplitModel(model, 2)
    static = StaticPasses(split, graphs=False)
    decoder = SelfSpecDecoder(split, make_head(model, 2, 0.0), make_length_policy("fixed", 3), passes=static)
    short = decoder.generate([1, 2, 3], max_new_tokens=8, eos_ids=set()).tokens
    first = static.cache
    assert first.capacity == 256  # rounded up: requests of similar length share one cache (and its graphs)
    long_prompt = list(range(3, 250)) + list(range(3, 60))
    assert decoder.generate(long_prompt, max_new_tokens=20, eos_ids=set()).tokens == plain_greedy(model, long_prompt, 20)
    assert static.cache is not first and static.cache.capacity == 512
    assert decoder.generate([1, 2, 3], max_new_tokens=8, eos_ids=set()).tokens == short


def test_modes():
    split = SplitModel(tiny_llama(), 2)
    assert pass_runner(split) is split and passes_mode(split) == "eager"  # auto on the CPU
    static = pass_runner(split, "static")
    assert isinstance(static, StaticPasses) and passes_mode(static) == "static"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        pass_runner(split, "graphs")
    with pytest.raises(ValueError, match="unknown passes mode 'fast'"):
        pass_runner(split, "fast")
    cache = static.new_cache(10)
    with pytest.raises(RuntimeError, match="overflow"):
        static.trunk(torch.arange(5), cache.capacity - 2, cache)


def test_bench_sizes_the_static_cache_before_anything_is_timed():
    """Growing the cache drops every captured graph: dvi bench sizes it for its longest prompt first."""
    from dvi.studies.bench import size_static_cache
    from selfspec.loading import ModelParts

    model = tiny_llama(max_positions=600)
    split = SplitModel(model, 2)
    head = make_head(model, 2, 0.0)
    parts = ModelParts(model, None, split, head, {}, passes=StaticPasses(split, graphs=False))
    longest = [3 + i % 250 for i in range(300)]
    size_static_cache(parts, [[1, 2, 3], longest], max_new_tokens=20, gamma=3)
    cache = parts.passes.cache
    assert cache.capacity == 512
    decoder = SelfSpecDecoder(split, head, make_length_policy("fixed", 3), passes=parts.passes)
    assert decoder.generate(longest, max_new_tokens=20, eos_ids=set()).tokens == plain_greedy(model, longest, 20)
    assert parts.passes.cache is cache
