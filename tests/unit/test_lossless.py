"""Greedy self-speculative decoding is token-identical to plain greedy decoding of the same model."""
import numpy as np
import pytest
import torch
from tiny_model import MAX_POS, make_head, make_length_policy, plain_greedy, plain_greedy_batch, tiny_llama

from selfspec.copy_sources import CopySources
from selfspec.engine import SelfSpecDecoder
from selfspec.length_policy import LengthPolicy
from selfspec.split import SplitModel

@pytest.fixture(scope="module")
def model():
    return tiny_llama(max_positions=MAX_POS)


FREE_RUN = 8  # EOS candidates: the first tokens of the model's own greedy run


def greedy_cases(seed: int) -> list[tuple[list[int], int, int | None]]:
    """A greedy setting's 32 random requests: (prompt, max_new, index into the free run of the EOS or
    None); the seed alone decides them, so they are drawn before any decoding."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(32):
        prompt = rng.integers(0, 256, int(rng.integers(1, 24))).tolist()
        max_new = int(rng.integers(1, 30))  # often lands mid-draft
        eos_at = int(rng.integers(0, FREE_RUN)) if rng.random() < 0.5 else None
        cases.append((prompt, max_new, eos_at))
    return cases


@pytest.fixture(scope="module")
def greedy_reference(model):
    """seed -> (greedy_cases(seed), each case's plain greedy run of max(max_new, FREE_RUN) tokens), the runs
    computed in one batched reference per seed, once per module (settings with the same seed share it)."""
    memo = {}

    def reference(seed):
        if seed not in memo:
            cases = greedy_cases(seed)
            memo[seed] = cases, plain_greedy_batch(model, [c[0] for c in cases], [max(c[1], FREE_RUN) for c in cases])
        return memo[seed]
    return reference


def test_batched_reference_is_plain_greedy(model):
    """The batched reference the tests below compare with is plain_greedy, token for token: prompts of
    every length side by side (1 to the context limit), each with its own count."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (1, 2, 7, 23, 40, MAX_POS - 5, MAX_POS - 1)]
    counts = [int(rng.integers(1, 30)) for _ in prompts]
    assert plain_greedy_batch(model, prompts, counts) == [plain_greedy(model, p, n) for p, n in zip(prompts, counts)]


SETTINGS = [  # (exit layer k, gamma, policy, head noise, reduced draft vocab, (attention layers, window))
    (1, 3, "fixed", 0.0, None, None),
    (2, 4, "fixed", 0.05, None, None),
    (2, 5, "threshold", 0.0, 64, None),
    (3, 4, "cost_aware", 0.05, None, None),
    (3, 5, "fixed", 0.0, 192, None),
    (2, 4, "fixed", 0.05, None, (1, 3)),  # a window shorter than most prompts
    (1, 5, "cost_aware", 0.05, 64, (2, 16)),  # rounds without drafts leave positions the head must catch up on
]


@pytest.mark.parametrize("k,gamma,policy,noise,vocab,attention", SETTINGS)
def test_greedy_identical_over_random_prompts(model, greedy_reference, k, gamma, policy, noise, vocab, attention):
    cases, runs = greedy_reference(k * 100 + gamma)
    head = make_head(model, k, noise, vocab, attention=attention)
    decoder = SelfSpecDecoder(SplitModel(model, k), head, make_length_policy(policy, gamma))
    per_position = np.zeros((gamma, 2))  # [accepted, rejected] at each draft position
    eos_inside_draft = 0
    for (prompt, max_new, eos_at), run in zip(cases, runs, strict=True):
        # EOS = a token the model itself emits a few steps in, so it often sits inside a draft. One reference
        # run serves both: greedy output with an EOS is the run without it, cut after the first EOS.
        assert len(run) >= FREE_RUN
        eos = set() if eos_at is None else {run[eos_at]}
        expected = run[:max_new]
        expected = expected[:next((i + 1 for i, t in enumerate(expected) if t in eos), len(expected))]
        result = decoder.generate(prompt, max_new_tokens=max_new, eos_ids=eos)
        assert result.tokens == expected, f"prompt={prompt} max_new={max_new} eos={eos}"
        emitted = 1
        for r in result.rounds:
            per_position[: r.accepted, 0] += 1
            if r.accepted < r.drafted:
                per_position[r.accepted, 1] += 1
            emitted += r.accepted + 1
            eos_inside_draft += bool(eos) and emitted > len(result.tokens) and result.stop_reason == "eos"
    if policy == "fixed":
        assert (per_position[:, 1] > 0).all(), f"no rejection at some position: {per_position}"
    assert per_position[:, 0].sum() > 0 and per_position[:, 1].sum() > 0
    assert eos_inside_draft > 0, "no case where EOS cut a round short"


def test_prompt_near_context_limit(model):
    head = make_head(model, 2, 0.05)
    decoder = SelfSpecDecoder(SplitModel(model, 2), head, LengthPolicy(4))
    rng = np.random.default_rng(7)
    for length in (MAX_POS - 1, MAX_POS - 2, MAX_POS - 5):
        prompt = rng.integers(0, 256, length).tolist()
        result = decoder.generate(prompt, max_new_tokens=20, eos_ids=set())
        assert len(prompt) + len(result.tokens) == MAX_POS
        assert result.tokens == plain_greedy(model, prompt, 20)


def test_trained_looking_head_is_still_lossless(model):
    """Whatever the head's weights (here: large random ones), the output is the model's own."""
    head = make_head(model, 2, 1.0, seed=3)
    with torch.no_grad():
        for p in head.adapter.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    decoder = SelfSpecDecoder(SplitModel(model, 2), head, LengthPolicy(4))
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, 256, 10).tolist() for _ in range(10)]
    for prompt, expected in zip(prompts, plain_greedy_batch(model, prompts, 25), strict=True):
        assert decoder.generate(prompt, max_new_tokens=25, eos_ids=set()).tokens == expected


@pytest.fixture(scope="module")
def ngram_cases(model):
    """25 (prompt, max_new, plain greedy output) whose prompts repeat spans (and the model's own
    continuations), the same for every n-gram setting: drawn and referenced once per module."""
    rng = np.random.default_rng(5)
    draws = []
    for _ in range(25):
        base = rng.integers(0, 256, int(rng.integers(2, 6))).tolist()
        continuation, cut, max_new = int(rng.integers(1, 6)), int(rng.integers(3, 20)), int(rng.integers(1, 30))
        draws.append((base, continuation, cut, max_new))
    continued = plain_greedy_batch(model, [d[0] for d in draws], [d[1] for d in draws])
    prompts = [[*base, *cont, *base][:cut] for (base, _, cut, _), cont in zip(draws, continued, strict=True)]
    expected = plain_greedy_batch(model, prompts, [d[3] for d in draws])
    return [(prompt, d[3], exp) for prompt, d, exp in zip(prompts, draws, expected, strict=True)]


@pytest.mark.parametrize("policy", ["fixed", "cost_aware"])
@pytest.mark.parametrize("drafter", [None, "mlp", "attention"])
def test_copied_ngram_drafts_are_lossless(model, ngram_cases, drafter, policy):
    """Prompts that repeat spans (and the model's own continuations) so that copied drafts are
    proposed, accepted and rejected; with a head, rounds without a match draft with it."""
    head = None if drafter is None else make_head(model, 2, 0.05, attention=(1, 6) if drafter == "attention" else None)
    decoder = SelfSpecDecoder(SplitModel(model, 2), head, make_length_policy(policy, 4), copies=CopySources(ngram=1))
    drafted = accepted = rejected = 0
    for prompt, max_new, expected in ngram_cases:
        result = decoder.generate(prompt, max_new_tokens=max_new, eos_ids=set())
        assert result.tokens == expected, f"prompt={prompt} max_new={max_new}"
        drafted += sum(r.drafted for r in result.rounds)
        accepted += sum(r.accepted for r in result.rounds)
        rejected += sum(r.accepted < r.drafted for r in result.rounds)
    assert drafted > 0 and accepted > 0 and rejected > 0
