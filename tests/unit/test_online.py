"""The online loop learns from the verifier: on a tiny verifier whose next token is a function of the
current token (attention switched off), a head starting at plain early exit (near chance) learns it."""
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_model import plain_greedy_batch, tiny_llama

from selfspec.drafter import DrafterHead, HeadConfig, load_head, save_head
from selfspec.engine import SelfSpecDecoder
from selfspec.greedy_paths import annotate_path, mean_accepted_length
from selfspec.length_policy import LengthPolicy
from learner.metrics_log import MetricsLog
from selfspec.online import OnlineConfig, OnlinePaths, frequent_ids, train_on_paths
from selfspec.split import SplitModel

K = 1


@pytest.fixture(scope="module")
def verifier():
    model = tiny_llama(seed=5, damp=1.0, init=0.3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
        model.model.norm.weight.mul_(3.0)  # a peaked distribution, as a trained LM has
    return model


@pytest.fixture(scope="module")
def paths(verifier):
    """The verifier's greedy paths from 56 random prompts: the tokens its plain decoding emits (decoded
    all at once by the batched reference, which test_lossless checks against the decoder), annotated."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, 8).tolist() for _ in range(56)]
    return [annotate_path(verifier, prompt + tokens, len(prompt), K, topk=16)
            for prompt, tokens in zip(prompts, plain_greedy_batch(verifier, prompts, 32), strict=True)]


@pytest.fixture(scope="module")
def trained(verifier, paths, tmp_path_factory):
    torch.manual_seed(0)
    cfg = OnlineConfig(head=HeadConfig(adapter_hidden=128, lora_rank=8), gamma=4, lr=3e-3,
                       chunk_prompts=8, epochs=2, batch_size=16, topk=16,
                       schedule_config=dict(warmup_steps=40, ramp_steps=40))
    head = DrafterHead(SplitModel(verifier, K), cfg.head)
    out = tmp_path_factory.mktemp("online")
    with MetricsLog(out) as log:
        result = train_on_paths(head, OnlinePaths(paths[:48], paths[48:]), cfg, log, progress=False)
    return head, result.curve, result.steps, result.versions, out


def test_acceptance_rises_from_chance_to_high(trained):
    _, curve, steps, versions, out = trained
    assert curve[0]["mal_heldout"] < 1.2, "plain early exit should be near chance here"
    assert curve[-1]["mal_heldout"] > 3.0, curve
    assert steps <= 120 and versions == 6
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == steps + versions  # one line per optimizer step, one per new head version
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())


def test_checkpoint_round_trip_is_lossless(trained, verifier, paths, tmp_path):
    head, *_ = trained
    save_head(head, tmp_path, {"base_model": "tiny", "version": 6})
    split, loaded, meta = load_head(verifier, tmp_path)
    assert meta["version"] == 6 and split.exit_layer == K
    x = torch.randn(5, 64, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), head(x), rtol=0, atol=0)
    assert mean_accepted_length(paths[48:], loaded, 4) == mean_accepted_length(paths[48:], head, 4)
    decoder = SelfSpecDecoder(split, loaded, LengthPolicy(4))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 256, 6).tolist() for _ in range(8)]
    accepted = 0
    for prompt, expected in zip(prompts, plain_greedy_batch(verifier, prompts, 30), strict=True):
        result = decoder.generate(prompt, max_new_tokens=30, eos_ids=set())
        assert result.tokens == expected
        accepted += sum(r.accepted for r in result.rounds)
    assert accepted > 8 * 10, "the trained head should be accepted often when really decoding"


def test_checkpoint_missing_says_what_to_run(verifier, tmp_path):
    with pytest.raises(FileNotFoundError, match="written by `dvi online --out-dir`"):
        load_head(verifier, Path(tmp_path) / "nothing")


def test_reduced_vocab_keeps_the_ids_the_model_emits(verifier, paths):
    split = SplitModel(verifier, K)
    emitted = np.concatenate([p.tokens[p.prompt_len:] for p in paths])
    distinct = np.unique(emitted)
    ids = frequent_ids(paths, split, len(distinct))
    np.testing.assert_array_equal(ids, distinct)  # exactly the emitted ids when the budget allows
    top = frequent_ids(paths, split, 16)
    counts = np.bincount(emitted, minlength=256)
    assert counts[top].min() >= np.sort(counts)[-16]  # the 16 most frequent (ties broken by id)
    assert frequent_ids(paths, split, None) is None


def test_sampled_responses_teach_what_few_greedy_paths_do_not(verifier, paths, tmp_path):
    """Distilling on sampled responses to the same 8 prompts covers more of the verifier's next-token
    function than their greedy paths alone: held-out acceptance ends clearly higher."""
    decoder = SelfSpecDecoder(SplitModel(verifier, K))
    train = paths[:8]
    sampled = []
    for p in train:
        prompt = p.tokens[:p.prompt_len].tolist()
        sampled.append([annotate_path(verifier, prompt + decoder.generate(prompt, max_new_tokens=32, temperature=1.0,
                                                                          seed=seed, eos_ids=set()).tokens,
                                      p.prompt_len, K, topk=16) for seed in range(3)])
    cfg = OnlineConfig(head=HeadConfig(adapter_hidden=128, lora_rank=8), gamma=4, lr=3e-3,
                       chunk_prompts=4, epochs=4, batch_size=16, topk=16, schedule="kl_only")

    def trained_mal(responses):
        torch.manual_seed(0)
        head = DrafterHead(SplitModel(verifier, K), cfg.head)
        result = train_on_paths(head, OnlinePaths(train, paths[48:], responses), cfg, progress=False)
        return result.curve[-1]["mal_heldout"], result.steps

    greedy_only, greedy_steps = trained_mal(None)
    with_sampled, sampled_steps = trained_mal(sampled)
    assert sampled_steps > 2 * greedy_steps
    assert with_sampled > greedy_only + 0.2, (greedy_only, with_sampled)
    with pytest.raises(ValueError, match="sampled responses for 7 prompts, but 8 training prompts"):
        OnlinePaths(train, paths[48:], sampled[:7])
