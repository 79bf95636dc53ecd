"""Simulated drafting along the greedy path decides exactly what the real decoder decides."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from tiny_model import plain_greedy_batch, tiny_llama

from selfspec.drafter import DrafterHead, HeadConfig
from selfspec.engine import TransitionSink, SelfSpecDecoder
from selfspec.transitions import DRAFTED
from selfspec.greedy_paths import (RecordSpec, annotate_path, mean_accepted_length, prompt_transitions, response_transitions,
                                   simulate_rounds)
from selfspec.length_policy import LengthPolicy
from selfspec.objectives import collate_for
from selfspec.split import SplitModel


def perturbed_head(split, attention_layers=0, window=0):
    head = DrafterHead(split, HeadConfig(adapter_hidden=16, lora_rank=2,
                                         attention_layers=attention_layers, context_window=window))
    with torch.no_grad():
        head.proj.lora_B.default.weight.normal_(0, 0.05)
        for p in head.layers.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return head


@pytest.mark.parametrize("attention_layers,window", [(0, 0), (1, 5)])
def test_simulation_matches_real_decoding(attention_layers, window):
    model = tiny_llama(seed=4)
    k, gamma = 2, 4
    split = SplitModel(model, k)
    head = perturbed_head(split, attention_layers, window)
    real_transitions = []
    decoder = SelfSpecDecoder(split, head, LengthPolicy(gamma), sink=TransitionSink(real_transitions.append, topk=8))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, int(rng.integers(2, 12))).tolist() for _ in range(12)]
    all_rounds = []
    for prompt, expected in zip(prompts, plain_greedy_batch(model, prompts, 30), strict=True):
        real_transitions.clear()
        result = decoder.generate(prompt, max_new_tokens=30, eos_ids=set())
        assert result.tokens == expected
        path = annotate_path(model, prompt + result.tokens, len(prompt), k, topk=8)
        accepted, transitions = simulate_rounds(path, head, gamma, RecordSpec(topk=8))
        assert accepted == [r.accepted for r in result.rounds]
        all_rounds += accepted
        # the decoder also sends the rounds without drafts (their rows are KL targets only)
        drafting = [t for t in real_transitions if (t.kind == DRAFTED).any()]
        assert len(transitions) == len(drafting)
        for sim, real in zip(transitions, drafting):
            sim.validate()
            on_path = real.on_path
            assert sim.n == on_path.sum() and sim.on_path.all()  # the simulation keeps on-path positions only
            np.testing.assert_array_equal(sim.accept_mask, real.accept_mask[on_path])
            # on the path the contexts are identical, so are the drafts and the verifier's view
            np.testing.assert_array_equal(sim.draft_tokens, real.draft_tokens[on_path])
            np.testing.assert_array_equal(sim.target_topk_ids, real.target_topk_ids[on_path])
            # the simulation drafts from the stored float16 hidden state, the decoder from the float64 one
            np.testing.assert_allclose(sim.draft_logprobs, real.draft_logprobs[on_path], atol=5e-3)
            np.testing.assert_allclose(sim.hidden.astype(float), real.hidden[on_path].astype(float), atol=1e-2)
            np.testing.assert_allclose(sim.context_hidden.astype(float), real.context_hidden.astype(float), atol=1e-2)
    assert 0 < np.mean(all_rounds) < gamma  # both accepts and rejects happened
    assert mean_accepted_length([path], head, gamma) == np.mean(accepted) + 1


def test_small_draft_vocab_gives_matching_topk_widths():
    model = tiny_llama(seed=4)
    split = SplitModel(model, 2)
    head = DrafterHead(split, HeadConfig(adapter_hidden=0, lora_rank=0, draft_vocab=16))
    prompt = [5, 6, 7]
    tokens = SelfSpecDecoder(split).generate(prompt, max_new_tokens=20, eos_ids=set()).tokens
    path = annotate_path(model, prompt + tokens, len(prompt), 2, topk=32)
    _, transitions = simulate_rounds(path, head, 4, RecordSpec(topk=24))  # > the 16-id draft vocab
    assert transitions
    for tr in transitions:
        tr.validate()
        assert tr.draft_topk_ids.shape[1] == tr.target_topk_ids.shape[1] == 16
        assert np.isin(tr.draft_topk_ids, head.vocab_ids.numpy()).all()


def test_training_from_transitions_sees_what_drafting_saw():
    """An attention head's logits recomputed from a Transition (its drafted positions plus the context
    window it carries) are the logits it drafted with, on and off the path: the learner's view is exact."""
    model = tiny_llama(seed=4)
    split = SplitModel(model, 2)
    head = perturbed_head(split, attention_layers=2, window=6)
    transitions = []
    decoder = SelfSpecDecoder(split, head, LengthPolicy(4), sink=TransitionSink(transitions.append, topk=8))
    rng = np.random.default_rng(1)
    for _ in range(6):
        decoder.generate(rng.integers(0, 256, int(rng.integers(1, 12))).tolist(), max_new_tokens=25, eos_ids=set())
    assert any(len(t.context_hidden) < 6 for t in transitions) and any(len(t.context_hidden) == 6 for t in transitions)
    assert any(not t.on_path.all() for t in transitions)
    batch = collate_for(head, transitions)
    with torch.no_grad():
        logp = torch.log_softmax(head.batch_logits(batch.hidden, batch.context, batch.context_len, batch.rows), -1)
    recomputed = logp.gather(1, batch.draft_idx[:, None])[:, 0]
    drafted = batch.draft_in_vocab  # rows nothing drafted (the last of each round) have no behaviour log-prob
    assert 0 < drafted.sum() < len(drafted)
    # stored hidden states are float16, the decoder drafted from float64 ones
    np.testing.assert_allclose(recomputed[drafted].numpy(), batch.draft_logprobs[drafted].numpy(), atol=5e-3)


def test_prompt_transitions_cover_the_prompt_without_reward():
    model = tiny_llama(seed=4)
    split = SplitModel(model, 2)
    head = perturbed_head(split, attention_layers=1, window=4)
    prompt = [3, 1, 4, 1, 5, 9, 2]
    tokens = SelfSpecDecoder(split).generate(prompt, max_new_tokens=6, eos_ids=set()).tokens
    path = annotate_path(model, prompt + tokens, len(prompt), 2, topk=8)
    transitions = prompt_transitions(path, head, 3, RecordSpec(topk=8))
    assert [t.n for t in transitions] == [3, 3, 1]
    # position i predicts token i + 1: the prompt's own tokens, then the first generated one
    np.testing.assert_array_equal(np.concatenate([t.target_tokens for t in transitions]), (prompt + tokens)[1:8])
    assert not any(t.on_path.any() or t.accept_mask.any() for t in transitions)
    assert [len(t.context_hidden) for t in transitions] == [0, 3, 4]
    for t in transitions:
        t.validate()


def test_response_transitions_cover_a_sampled_response_without_reward():
    model = tiny_llama(seed=4)
    split = SplitModel(model, 2)
    head = perturbed_head(split, attention_layers=1, window=4)
    prompt = [3, 1, 4, 1, 5, 9, 2]
    tokens = SelfSpecDecoder(split).generate(prompt, max_new_tokens=7, temperature=1.0, seed=0, eos_ids=set()).tokens
    path = replace(annotate_path(model, prompt + tokens, len(prompt), 2, topk=8), prompt_id="p")
    transitions = response_transitions(path, head, 4, "sampled0", RecordSpec(topk=8))
    assert [t.n for t in transitions] == [4, 2]  # positions 7..12 predict the response's tokens 2..7
    np.testing.assert_array_equal(np.concatenate([t.target_tokens for t in transitions]), tokens[1:])
    assert {t.request_id for t in transitions} == {"p:sampled0"}
    assert not any(t.on_path.any() or t.accept_mask.any() for t in transitions)
    assert [len(t.context_hidden) for t in transitions] == [4, 4]
    # the same logits the head computes along the whole sequence, sliced at the response
    with torch.no_grad():
        full = torch.log_softmax(head.path_logits(torch.from_numpy(path.hidden).double(), 0, len(path.tokens) - 1), -1)
    stored = np.concatenate([t.draft_logprobs for t in transitions])
    drafted = head.to_full_ids(full.argmax(-1)).numpy()[len(prompt):]
    np.testing.assert_array_equal(np.concatenate([t.draft_tokens for t in transitions]), drafted)
    np.testing.assert_allclose(stored, full.max(-1).values.numpy()[len(prompt):], atol=1e-5)
    assert response_transitions(annotate_path(model, prompt, len(prompt), 2, topk=8), head, 4, "sampled0", RecordSpec()) == []
