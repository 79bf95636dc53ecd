"""The cache is shared and rolled back correctly: no trunk layer runs twice for a drafted token, and
after a rejection the next verification sees exactly what a fresh full forward sees."""
import numpy as np
import pytest
import torch
from tiny_model import tiny_llama

from selfspec.drafter import DrafterHead, HeadConfig
from selfspec.engine import TransitionSink, SelfSpecDecoder
from selfspec.transitions import DISTILL, DRAFTED, PLAIN
from selfspec.length_policy import LengthPolicy
from selfspec.split import SplitModel


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=1)


def count_tokens(module, counter):
    return module.register_forward_hook(lambda mod, args, out: counter.append(args[0].shape[1]))


def test_trunk_never_runs_twice_for_a_drafted_token(model):
    k = 2
    split = SplitModel(model, k, lean=False)  # HF layers, whose forward hooks count the tokens they see
    decoder = SelfSpecDecoder(split, DrafterHead(split, HeadConfig(adapter_hidden=0, lora_rank=0)),
                              LengthPolicy(4))
    trunk_seen, verifier_seen = [], []
    hooks = [count_tokens(split.layers[0], trunk_seen), count_tokens(split.layers[k], verifier_seen)]
    prompt = list(range(5, 17))
    result = decoder.generate(prompt, max_new_tokens=40, eos_ids=set())
    for h in hooks:
        h.remove()
    drafted = sum(r.drafted for r in result.rounds)
    assert drafted > 0 and any(r.accepted < r.drafted for r in result.rounds)
    # each round: the pending token once + each draft once, for both halves of the model
    expected = len(prompt) + sum(1 + r.drafted for r in result.rounds)
    assert sum(trunk_seen) == expected
    assert sum(verifier_seen) == expected
    # the trunk ran one token at a time after prefill; the verifier ran each round as one block
    assert all(n == 1 for n in trunk_seen[1:])
    assert verifier_seen[1:] == [1 + r.drafted for r in result.rounds]


def test_verification_after_rejection_equals_fresh_forward(model):
    k = 2
    split = SplitModel(model, k)
    transitions = []
    decoder = SelfSpecDecoder(split, DrafterHead(split, HeadConfig(adapter_hidden=0, lora_rank=0)),
                              LengthPolicy(4), sink=TransitionSink(transitions.append, topk=8))
    prompt = [3, 14, 15, 92, 65, 35]
    result = decoder.generate(prompt, max_new_tokens=40, eos_ids=set())
    assert len(transitions) == len(result.rounds)  # every round's verified positions are data
    pending_index, checked = 0, 0
    for i, (r, tr) in enumerate(zip(result.rounds, transitions)):
        assert tr.n == r.drafted + 1  # the pending token and each draft
        if i > 0 and result.rounds[i - 1].accepted < result.rounds[i - 1].drafted:
            seq = prompt + result.tokens[: pending_index + 1] + tr.draft_tokens[:r.drafted].tolist()
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([seq])).logits[0], -1)
            start = len(prompt) + pending_index
            fresh = logp[start:start + tr.n].topk(8, -1)
            np.testing.assert_array_equal(tr.target_topk_ids, fresh.indices.numpy())
            np.testing.assert_allclose(tr.target_topk_logprobs, fresh.values.numpy(), rtol=0, atol=1e-5)
            checked += 1
        pending_index += r.accepted + 1
    assert checked >= 3, "too few rounds after a rejection to check"


def test_transition_fields(model):
    k = 2
    split = SplitModel(model, k)
    head = DrafterHead(split, HeadConfig(adapter_hidden=8, lora_rank=2, context_window=4))
    transitions = []
    decoder = SelfSpecDecoder(split, head, LengthPolicy(3),
                              sink=TransitionSink(transitions.append, run_id="r", actor_id=2, topk=5))
    decoder.set_head(head, version=7)  # as an actor swaps in a published head
    decoder.generate([1, 2, 3], max_new_tokens=20, eos_ids=set(), request_id="q", workload="w")
    assert transitions
    for i, tr in enumerate(transitions):
        tr.validate()
        assert tr.transition_id == f"r:2:q:{i + 1}"
        # up to W committed positions before the draft: the 3-token prompt first, then a full window
        assert tr.hidden.shape == (tr.n, 64) and tr.context_hidden.shape == ((3 if i == 0 else 4), 64)
        assert tr.head_version == 7 and tr.workload == "w"
        assert tr.draft_topk_ids.shape == (tr.n, 5)
        drafted = tr.kind == DRAFTED
        # the head drafted every row but the last, whose next token nothing proposed (plain, KL only)
        assert drafted[:-1].all() and tr.kind[-1] == PLAIN and tr.draft_tokens[-1] == -1
        assert not (tr.on_path[-1] or tr.accept_mask[-1])
        # greedy drafts are the head's argmax: the top-1 of its own distribution
        np.testing.assert_array_equal(tr.draft_tokens[drafted], tr.draft_topk_ids[drafted, 0])
        np.testing.assert_allclose(tr.draft_logprobs[drafted], tr.draft_topk_logprobs[drafted, 0], rtol=1e-6)
        accepted = tr.accept_mask.sum()
        np.testing.assert_array_equal(tr.target_tokens[:accepted], tr.draft_tokens[:accepted])
        if accepted < drafted.sum():
            assert tr.target_tokens[accepted] != tr.draft_tokens[accepted]
    # the hidden state stored is the trunk's layer-k output at that position
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    np.testing.assert_allclose(transitions[0].context_hidden[-3:].astype(np.float64),
                               out.hidden_states[k][0].numpy(), rtol=1e-2, atol=1e-2)


def test_prompt_positions_are_kl_rows(model):
    """With prompt_rows, the prefill's last positions go out first: the layer-k states and the full
    model's distribution there, each row's next token the prompt's own (then the first generated)."""
    k = 2
    split = SplitModel(model, k)
    transitions = []
    decoder = SelfSpecDecoder(split, DrafterHead(split, HeadConfig(adapter_hidden=0, lora_rank=0)), LengthPolicy(3),
                              sink=TransitionSink(transitions.append, topk=8, prompt_rows=4))
    prompt = [3, 14, 15, 92, 65, 35]
    result = decoder.generate(prompt, max_new_tokens=12, eos_ids=set(), request_id="q")
    first, rest = transitions[0], transitions[1:]
    assert len(rest) == len(result.rounds)  # the rounds' transitions are as before
    assert first.round == 0 and first.n == 4 and (first.kind == DISTILL).all()
    assert not (first.on_path.any() or first.accept_mask.any()) and (first.draft_tokens == -1).all()
    assert first.target_tokens.tolist() == prompt[-3:] + [result.tokens[0]]
    with torch.no_grad():
        out = model(torch.tensor([prompt]), output_hidden_states=True)
    fresh = torch.log_softmax(out.logits[0, -4:], -1).topk(8, -1)
    np.testing.assert_array_equal(first.target_topk_ids, fresh.indices.numpy())
    np.testing.assert_allclose(first.hidden.astype(np.float64), out.hidden_states[k][0, -4:].numpy(),
                               rtol=1e-2, atol=1e-2)
