"""The GPU path on CUDA (skipped without one; run with `pytest -m gpu`): decode passes replayed as CUDA graphs
equal the same passes run eagerly, bit for bit; greedy decoding of the tiny model (graphs, the default on
CUDA, and eager; alone and batched) is token-identical to a plain full-forward greedy reference in float64 and float32;
speculative sampling passes the same chi-square tests as on the CPU with CUDA generators; cost
measurement synchronises; and `dvi bench --device cuda` runs end to end (float32 and bfloat16)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from test_passes import run_script  # noqa: E402
from test_sampling import check_acceptance_rule, check_decoder_samples  # noqa: E402
from tiny_model import MAX_POS, make_head, make_length_policy, plain_greedy, save_tiny_model, tiny_llama, write_prompts  # noqa: E402,E501

from dvi import cli  # noqa: E402
from selfspec.copy_sources import CopySources
from selfspec.passes import StaticPasses, pass_runner, passes_mode  # noqa: E402
from selfspec.engine import SelfSpecDecoder  # noqa: E402
from selfspec.loading import make_length_policy as named_policy  # noqa: E402
from selfspec.split import SplitModel  # noqa: E402

CUDA = torch.device("cuda")
# float32 on a GPU: the cached decode and the full forward round differently (~1e-6), so a near-tie of the
# top two logits may break either way; anything else that differs is a bug.
NEAR_TIE = {torch.float64: 0.0, torch.float32: 1e-4}


def first_divergence_margin(model, prompt: list[int], ref: list[int], got: list[int]) -> float:
    """The full model's top-2 logit margin where `got` first departs from `ref`."""
    i = next(j for j, (a, b) in enumerate(zip(ref, got)) if a != b)
    with torch.no_grad():
        top = model(torch.tensor([prompt + ref[:i]], device=model.device)).logits[0, -1].double().topk(2).values
    return float(top[0] - top[1])


def test_graph_replays_equal_eager_bit_for_bit():
    model = tiny_llama(max_positions=64).to(CUDA, torch.float32)
    split = SplitModel(model, 2)
    graphs, eager = StaticPasses(split, graphs=True), StaticPasses(split, graphs=False)
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1)).to(CUDA)
    with torch.inference_mode():
        replayed = run_script(graphs, graphs.new_cache(48), ids)
        expected = run_script(eager, eager.new_cache(48), ids)
        assert graphs.fallback is None
        # prefill, one token at positions 9..14 (one graph, replayed at each), blocks of 3
        assert {("trunk", 9), ("verify", 9), ("trunk", 1), ("verify", 1), ("trunk", 3), ("verify", 3)} <= set(graphs.captured)
        for a, b in zip(replayed, expected, strict=True):
            assert torch.equal(a, b)
        head = make_head(model, 2, 0.05)
        for hidden in replayed[2:5]:  # the head's step: captured on the first call, replayed on the next
            assert torch.equal(graphs.head_logits(head, hidden, 0, None), eager.head_logits(head, hidden, 0, None))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("policy", ["fixed", "cost_aware"])
@pytest.mark.parametrize("mode", ["graphs", "eager"])
def test_greedy_identical_on_cuda(dtype, policy, mode):
    model = tiny_llama(max_positions=MAX_POS).to(CUDA, dtype)
    head = make_head(model, 2, 0.05)
    assert head.proj.weight.device.type == "cuda" and head.proj.weight.dtype == dtype
    split = SplitModel(model, 2)
    passes = pass_runner(split, "auto" if mode == "graphs" else mode)
    decoder = SelfSpecDecoder(split, head, make_length_policy(policy, 4), copies=CopySources(ngram=1), passes=passes)
    rng = np.random.default_rng(3)
    drafted = accepted = identical = 0
    n = 30
    for _ in range(n):
        prompt = rng.integers(0, 256, int(rng.integers(1, 24))).tolist()
        max_new = int(rng.integers(1, 30))
        eos = {plain_greedy(model, prompt, 4)[-1]} if rng.random() < 0.3 else set()
        expected = plain_greedy(model, prompt, max_new, eos)
        result = decoder.generate(prompt, max_new_tokens=max_new, eos_ids=eos)
        drafted += sum(r.drafted for r in result.rounds)
        accepted += sum(r.accepted for r in result.rounds)
        if result.tokens == expected:
            identical += 1
            continue
        margin = first_divergence_margin(model, prompt, expected, result.tokens)
        assert margin <= NEAR_TIE[dtype], f"prompt={prompt} max_new={max_new}: departs where the margin is {margin}"
    assert drafted > 0 and 0 < accepted < drafted
    assert identical >= (n if dtype == torch.float64 else n - 2)
    assert passes_mode(decoder.passes) == mode  # auto is graphs on CUDA, and no capture fell back


@pytest.mark.parametrize("max_batch", [3, 8])
def test_batched_graphs_decode_like_alone_on_cuda(max_batch):
    """Continuous batching on CUDA graphs (a graph per batch bucket, spare rows in free slots): every row is
    plain greedy decoding, in float64."""
    from selfspec.batching import Batcher

    model = tiny_llama(max_positions=MAX_POS).to(CUDA, torch.float64)
    split = SplitModel(model, 2)
    decoder = SelfSpecDecoder(split, make_head(model, 2, 0.05), make_length_policy("fixed", 4), CopySources(ngram=1),
                              passes=pass_runner(split, "graphs"))
    rng = np.random.default_rng(5)
    requests = [(rng.integers(0, 256, int(rng.integers(1, 24))).tolist(), int(rng.integers(1, 30))) for _ in range(12)]
    batcher = Batcher(decoder, max_batch)
    try:
        handles = [batcher.submit(prompt, max_new_tokens=n) for prompt, n in requests]
        for (prompt, n), handle in zip(requests, handles):
            assert handle.wait().tokens == plain_greedy(model, prompt, n)
    finally:
        batcher.close()
    assert batcher.mean_batch_size > 1 and passes_mode(decoder.passes) == "graphs"


def test_measured_costs_on_cuda():
    model = tiny_llama(max_positions=MAX_POS).to(CUDA, torch.float32)
    split = SplitModel(model, 2)
    head = make_head(model, 2, 0.0)
    policy = named_policy("cost_aware", 4, split, head)  # measure_pass_costs, synchronised
    costs = policy.costs
    assert all(0 < c < 1 for c in [costs.trunk, costs.head, *costs.verify[1:], *costs.trunk_block[1:]])
    result = SelfSpecDecoder(split, head, policy).generate([1, 2, 3], max_new_tokens=12, eos_ids=set())
    assert result.tokens == plain_greedy(model, [1, 2, 3], 12)


def test_acceptance_rule_on_cuda():
    check_acceptance_rule("cuda")


@pytest.mark.parametrize("drafts", ["head", "ngram"])
def test_decoder_samples_from_the_model_distribution_on_cuda(drafts):
    check_decoder_samples(drafts, "cuda")


def test_seeded_sampling_repeats_on_cuda():
    model = tiny_llama(seed=2, vocab=32).to(CUDA)
    split = SplitModel(model, 2)
    decoder = SelfSpecDecoder(split, make_head(model, 2, 0.05), make_length_policy("fixed", 3))
    runs = [decoder.generate([5, 9, 2], max_new_tokens=16, temperature=0.8, seed=s, eos_ids=set()).tokens
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_on_cuda(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(cli, "COMMANDS", {"bench": "dvi.cli.bench"})
    model_dir = save_tiny_model(tmp_path / "model")
    prompts = write_prompts(tmp_path / "q.jsonl", ["Sort a list.", "Why is the sky blue?", "Write a haiku."])
    out = tmp_path / "bench.json"
    methods = "hf_ar,hf_static,dvi_ar,dvi_spec_dynamic,dvi_spec_ngram_dynamic"
    assert cli.main(["bench", "--device", "cuda", "--dtype", dtype, "--model", str(model_dir), "--prompts", str(prompts),
                     "--n", "3", "--max-new-tokens", "16", "-k", "2", "--methods", methods, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"].startswith("cuda") and report["dtype"] == dtype and report["dtype_reason"] == "requested"
    assert report["machine"] == torch.cuda.get_device_name() and report["thin_gemm_rows"] == []
    assert report["passes"] == "graphs" and "passes_fallback" not in report
    assert [m["name"] for m in report["methods"]] == methods.split(",")
    for m in report["methods"]:
        assert m["tokens"] > 0 and m["tokens_per_s"] > 0
        if dtype == "float32":  # bfloat16 may depart from hf_ar anywhere (what --dtype auto avoids)
            assert all(d["logit_margin"] <= NEAR_TIE[torch.float32] for d in m.get("divergences", []))
