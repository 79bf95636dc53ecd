"""What the batching tests share: the tiny model and 16 requests with their plain greedy runs on it (fixtures
`model` and `reference`, imported by name), and decoders with seeded heads."""
from __future__ import annotations

import numpy as np
import torch
import pytest
from tiny_model import MAX_POS, make_head, make_length_policy, plain_greedy_batch, tiny_llama

from selfspec.engine import SelfSpecDecoder
from selfspec.split import SplitModel


FREE_RUN = 8  # EOS candidates: the first tokens of the model's own greedy run


@pytest.fixture(scope="module", name="model")
def model_fixture():
    return tiny_llama(max_positions=MAX_POS)


@pytest.fixture(scope="module", name="reference")
def reference_fixture(model):
    return requests_and_runs(model)


def requests_and_runs(model) -> list[tuple[list[int], dict, list[int]]]:
    """16 requests (prompt, max_new, EOS or None) and each one's plain greedy run of max(max_new, FREE_RUN)
    tokens (fewer only at the context limit). Half the prompts repeat a span with the model's own
    continuation between (copied n-gram drafts get accepted), one ends at its prefill (max_new 1), one has
    room for 3 tokens only (its prompt near the context limit); half of the others stop at an EOS taken from
    their own run, so rows end by EOS while others go on."""
    rng = np.random.default_rng(29)
    bases = [rng.integers(0, 256, int(rng.integers(2, 6))).tolist() for _ in range(8)]
    continued = plain_greedy_batch(model, bases, [int(rng.integers(1, 6)) for _ in bases])
    prompts = [[*base, *cont, *base] for base, cont in zip(bases, continued, strict=True)]
    prompts += [rng.integers(0, 256, int(rng.integers(1, 24))).tolist() for _ in range(7)]
    prompts.append(rng.integers(0, 256, MAX_POS - 3).tolist())
    max_new = [int(rng.integers(2, 30)) for _ in prompts]
    max_new[3] = 1
    runs = plain_greedy_batch(model, prompts, [max(n, FREE_RUN) for n in max_new])
    cases = []
    for i, (prompt, n, run) in enumerate(zip(prompts, max_new, runs, strict=True)):
        eos = {run[int(rng.integers(0, FREE_RUN))]} if len(run) >= FREE_RUN and i % 2 else set()
        expected = run[:n]
        expected = expected[:next((j + 1 for j, t in enumerate(expected) if t in eos), len(expected))]
        cases.append((prompt, dict(max_new_tokens=n, eos_ids=eos), expected))
    assert len(runs[-1]) == 3 and any(c[1]["eos_ids"] and len(c[2]) < c[1]["max_new_tokens"] for c in cases)
    return cases



def seeded_head(model, k, noise, vocab=None, attention=None):
    """make_head, LoRA's A (which it draws from the global generator) seeded: the same settings give the same
    head whatever ran before. noise None: no head."""
    if noise is None:
        return None
    torch.manual_seed(0)
    return make_head(model, k, noise, vocab, attention=attention)


def make_decoder(model, k, gamma, policy, noise, vocab=None, attention=None, **kwargs) -> SelfSpecDecoder:
    """A decoder with a fresh length policy and head (noise None: none); `kwargs` go to SelfSpecDecoder."""
    head = seeded_head(model, k, noise, vocab, attention)
    return SelfSpecDecoder(SplitModel(model, k), head, make_length_policy(policy, gamma), **kwargs)
