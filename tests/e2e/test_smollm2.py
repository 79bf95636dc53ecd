"""End to end on the real default model (SmolLM2-135M, float32): lossless against transformers' own
greedy generate, and one-line errors from the CLI."""
import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from dvi.cli import main
from selfspec.copy_sources import CopySources
from selfspec.engine import SelfSpecDecoder
from selfspec.loading import load_model_parts, make_length_policy
from selfspec.prompts import chat_ids, load_prompts


@pytest.fixture(scope="module")
def parts():
    return load_model_parts("smollm2-135m", exit_layer=4)


# Fixed γ drafts (and is rejected) every round: the hardest case. The other policies are covered on the
# tiny model (test_lossless); copied drafts on this model also by the bench test below.
@pytest.mark.parametrize("policy,gamma", [("fixed", 4)])
def test_identical_to_hf_generate(parts, policy, gamma):
    decoder = SelfSpecDecoder(parts.split, parts.head, make_length_policy(policy, gamma, parts.split, parts.head))
    for prompt in load_prompts("builtin", 2):  # a chat and a code prompt; more in `dvi bench` and `dvi eval`
        ids = chat_ids(parts.tokenizer, prompt.text)
        with torch.inference_mode():
            ref = parts.model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):].tolist()
        result = decoder.generate(ids, max_new_tokens=40)
        assert result.tokens == ref, prompt.id
        assert sum(r.accepted for r in result.rounds) + len(result.rounds) + 1 == len(result.tokens) or \
            result.stop_reason == "eos"


def test_a_batch_decodes_each_row_as_hf_generate(parts):
    """Continuous batching on the real model: four requests of different lengths, joining as others leave
    (max_batch 3), each with fixed γ=4 and copied drafts, token-identical to transformers' greedy generate
    on it alone."""
    from selfspec.batching import Batcher

    decoder = SelfSpecDecoder(parts.split, parts.head, make_length_policy("fixed", 4, parts.split, parts.head),
                              CopySources(ngram=1))
    requests = [(chat_ids(parts.tokenizer, p.text), n) for p, n in zip(load_prompts("builtin", 4), (12, 40, 24, 32))]
    batcher = Batcher(decoder, 3)
    try:
        handles = [batcher.submit(ids, max_new_tokens=n) for ids, n in requests]
        results = [h.wait() for h in handles]
    finally:
        batcher.close()
    for (ids, n), result in zip(requests, results):
        with torch.inference_mode():
            ref = parts.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
        assert result.tokens == ref
    assert batcher.mean_batch_size > 1.5 and max(r.batch for res in results for r in res.rounds) == 3


def test_sampled_rows_drafting_from_a_traffic_memory_follow_the_model(parts):
    """Sampling through remembered drafts on the real model: 160 requests of one prompt, each with its own
    seed, batched up to 32, whose traffic memory holds the prompt's greedy answer. The second token, the first
    one verified against a draft, follows the model's exact marginal (chi-square); remembered drafts were
    both accepted and rejected; and a decoder that accepted them all would fail the same test."""
    from selfspec.batching import Batcher
    from selfspec.suffix_index import SuffixIndex, SuffixIndexConfig
    from test_sampling import ALPHA, chi_square_pvalue

    temperature, samples = 0.6, 160
    ids = parts.tokenizer("The capital of France is").input_ids
    with torch.inference_mode():
        greedy = parts.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
        p1 = torch.softmax(parts.model(torch.tensor([ids])).logits[0, -1].double() / temperature, -1)
        first = torch.argsort(p1, descending=True)[:256]
        assert p1[first].sum() > 0.999  # the exact marginal below leaves out less than 0.1% of the mass
        p2_given = torch.softmax(parts.model(torch.tensor([[*ids, t] for t in first.tolist()])).logits[:, -1].double()
                                 / temperature, -1)
    exact = (p1[first, None] * p2_given).sum(0) / p1[first].sum()
    memory = SuffixIndex(SuffixIndexConfig(min_match=1))
    memory.insert([*ids, *greedy])
    decoder = SelfSpecDecoder(parts.split, parts.head, make_length_policy("fixed", 4, parts.split, parts.head),
                              copies=CopySources(memory=memory))
    batcher = Batcher(decoder, 32)
    try:
        # 3 tokens: the round after the first token has room for a draft
        handles = [batcher.submit(ids, max_new_tokens=3, temperature=temperature, seed=s, eos_ids=set())
                   for s in range(samples)]
        results = [h.wait() for h in handles]
    finally:
        batcher.close()
    remembered = [r.rounds[0] for r in results if r.rounds[0].kind == "remembered"]
    # enough requests that remembered drafts are both accepted and rejected
    assert sum(r.accepted > 0 for r in remembered) > 5 and sum(r.accepted < r.drafted for r in remembered) > 5
    counts = np.bincount([r.tokens[1] for r in results], minlength=len(exact))
    assert chi_square_pvalue(counts, exact.numpy()) > ALPHA
    g0 = (first == greedy[0]).nonzero().item()  # power: every remembered draft accepted moves mass to greedy[1]
    always = exact * p1[first].sum() - p1[greedy[0]] * p2_given[g0]
    always[greedy[1]] += p1[greedy[0]]
    assert chi_square_pvalue(counts, (always / always.sum()).numpy()) < ALPHA


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "  "], r"empty prompt: give --prompt some text$"),
    (["--prompt", "hi", "--temperature", "-1"], r"--temperature must be >= 0 \(0 = greedy\), got -1.0$"),
    (["--prompt", "hi", "--exit-layer", "30"], r"--exit-layer 30: the model smollm2-135m has 30 layers \(--exit-layer must be 1\.\.29\)$"),
    (["--prompt", "word " * 8200, "--raw"],
     r"prompt has 82\d\d tokens but the model has 8192 positions; shorten it to at most 8191$"),
    (["--prompt", "hi", "--model", "/nonexistent/model"], r"model '/nonexistent/model' not found: .* or one of"),
])
def test_cli_errors_are_one_line(capsys, argv, message):
    code, _, err = run_cli(capsys, "generate", *argv)
    assert code == 2
    assert re.match("dvi generate: error: " + message, err) and "\n" not in err, err


def test_cli_generate_prints_text_and_stats(capsys):
    code, out, _ = run_cli(capsys, "generate", "--prompt", "What is 2 + 2?", "--max-new-tokens", "16",
                           "--length-policy", "fixed", "--gamma", "3")
    assert code == 0
    assert "mean accepted length" in out and "exit layer 4, fixed gamma=3" in out


def test_online_head_loads_in_generate_and_bench(capsys, tmp_path):
    head_dir = tmp_path / "head"
    code, out, _ = run_cli(capsys, "online", "--workload", "builtin", "--train-prompts", "4", "--heldout-prompts", "2",
                           "--max-new-tokens", "16", "--set", "sampled_responses=1", "--out-dir", str(head_dir))
    assert code == 0 and '"mal_before"' in out
    summary = json.loads((head_dir / "summary.json").read_text())
    assert summary["train_prompts"] == 4 and summary["heldout_prompts"] == 2 and summary["steps"] > 0
    assert summary["sampled_responses"] == 1
    assert summary["versions"]["torch"] and summary["head_versions"] >= 1
    assert {"head.safetensors", "head.json", "metrics.jsonl", "mal.png", "summary.json"} <= {p.name for p in head_dir.iterdir()}
    code, out, _ = run_cli(capsys, "generate", "--prompt", "Hi!", "--head-path", str(head_dir), "--max-new-tokens", "8",
                           "--length-policy", "fixed")
    assert code == 0 and "exit layer 4" in out
    report_file = tmp_path / "bench.json"
    code, out, _ = run_cli(capsys, "bench", "--n", "1", "--max-new-tokens", "16", "--methods", "dvi_ar,dvi_spec_ngram",
                           "--head-path", str(head_dir), "--out", str(report_file))
    assert code == 0
    report = json.loads(report_file.read_text())
    assert [m["name"] for m in report["methods"]] == ["hf_ar", "dvi_ar", "dvi_spec_ngram"]
    assert all(m["identical_to_ar"] == 1.0 for m in report["methods"])
    assert report["head_path"] == str(head_dir)


def test_synthetic_prompts_imitate_their_seeds(parts, tmp_path):
    from selfspec.synthetic_prompts import SynthOptions, synthesize_prompts, write_spec_bench_jsonl

    seeds = [p for p in load_prompts("builtin") if p.category == "translation"]
    made = synthesize_prompts(parts.model, parts.tokenizer, seeds, 4,
                              SynthOptions(batch_size=4, max_new_tokens=24, progress=False))
    assert len(made) == 4 and len({p.id for p in made}) == 4
    assert all(p.category == "synthetic-translation" for p in made)
    assert all(p.text.startswith("Translate to ") and p.text not in {s.text for s in seeds} for p in made)
    write_spec_bench_jsonl(made, tmp_path / "more.jsonl")
    assert load_prompts(str(tmp_path / "more.jsonl")) == made


def test_synthesis_that_only_repeats_stops_with_a_clear_error(parts):
    from selfspec.synthetic_prompts import SynthOptions, synthesize_prompts

    seeds = [p for p in load_prompts("builtin") if p.category == "qa"][:3]  # 6 shot orders at most
    with pytest.raises(RuntimeError, match="wrote no new prompt .* try a higher temperature"):
        synthesize_prompts(parts.model, parts.tokenizer, seeds, 50,
                           SynthOptions(batch_size=8, max_new_tokens=12, temperature=1e-4, max_barren_batches=2,
                                        progress=False))


def test_greedy_paths_are_cached_per_prompt(parts, tmp_path):
    from selfspec.greedy_paths import PathSpec, Sampling, generate_paths
    from selfspec.path_cache import cached_paths

    a, b, c = load_prompts("builtin", 3)
    k4, k2 = PathSpec("smollm2-135m", 8, 4), PathSpec("smollm2-135m", 8, 2)
    sampling = Sampling(0.8, 0.95, seed=3)
    first = cached_paths(parts.model, parts.tokenizer, [a, b], k4, folder=tmp_path)
    files = {f.name: f.stat().st_mtime_ns for f in tmp_path.iterdir()}
    assert len(files) == 4  # per prompt: its greedy tokens, and their layer-4 annotation

    second = cached_paths(parts.model, parts.tokenizer, [b, c], k4, folder=tmp_path)
    new = {f.name for f in tmp_path.iterdir()} - set(files)
    assert len(new) == 2 and all(f.stat().st_mtime_ns == files[f.name] for f in tmp_path.iterdir() if f.name in files)
    assert second[0].prompt_id == b.id and np.array_equal(second[0].tokens, first[1].tokens)
    assert np.array_equal(second[0].hidden, first[1].hidden)
    assert second[1].prompt_len < len(second[1].tokens) <= second[1].prompt_len + 8

    # another exit layer annotates the cached tokens again without generating them again
    at_k2 = cached_paths(parts.model, parts.tokenizer, [a], k2, folder=tmp_path)
    added = {f.name for f in tmp_path.iterdir()} - set(files) - new
    assert len(added) == 1 and added.pop().endswith(".k2.npz")
    assert np.array_equal(at_k2[0].tokens, first[0].tokens)
    assert not np.array_equal(at_k2[0].hidden, first[0].hidden)

    # sampled continuations are cached apart from greedy ones, per seed, drawn as generate_paths draws them
    before = {f.name for f in tmp_path.iterdir()}
    sampled = cached_paths(parts.model, parts.tokenizer, [a], replace(k4, sampling=sampling), folder=tmp_path)
    assert len({f.name for f in tmp_path.iterdir()} - before) == 2
    torch.manual_seed(3)
    [(tokens, _)] = generate_paths(parts.model, parts.tokenizer, [a], replace(k4, sampling=sampling), progress=False)
    assert sampled[0].tokens.tolist() == tokens
    again = cached_paths(parts.model, parts.tokenizer, [a], replace(k4, sampling=sampling), folder=tmp_path)
    assert len({f.name for f in tmp_path.iterdir()} - before) == 2 and np.array_equal(again[0].tokens, sampled[0].tokens)
    cached_paths(parts.model, parts.tokenizer, [a], replace(k4, sampling=replace(sampling, seed=4)),
                 folder=tmp_path)
    assert len({f.name for f in tmp_path.iterdir()} - before) == 4


def test_sampled_paths_vary_and_repeat_with_the_seed(parts):
    from selfspec.greedy_paths import PathSpec, Sampling, generate_paths

    prompts = load_prompts("builtin", 2)
    spec = PathSpec("smollm2-135m", 12, 4)
    greedy = generate_paths(parts.model, parts.tokenizer, prompts, spec, progress=False)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(generate_paths(parts.model, parts.tokenizer, prompts, replace(spec, sampling=Sampling(0.8, 0.95)),
                                   progress=False))
    assert runs[0] == runs[1] and runs[0] != runs[2] and runs[0] != greedy
    assert [n for _, n in runs[0]] == [n for _, n in greedy]  # the same prompts, only the continuations differ
