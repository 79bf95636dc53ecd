"""Speculative sampling reproduces the model's own sampling distribution (chi-square tests, fixed seeds).

The checks take a device: tests/gpu/test_gpu.py runs the same ones on CUDA, with CUDA random generators."""
import numpy as np
import pytest
import torch
from tiny_model import plain_greedy, tiny_llama

from selfspec.acceptance import sampling_accept
from selfspec.drafter import DrafterHead, HeadConfig
from selfspec.copy_sources import CopySources
from selfspec.engine import TransitionSink, SelfSpecDecoder
from selfspec.transitions import COPIED, DRAFTED, PLAIN
from selfspec.length_policy import LengthPolicy
from selfspec.split import SplitModel

ALPHA = 1e-3  # a false alarm once in a thousand runs at most; seeds are fixed, so this run is deterministic


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square goodness of fit, pooling outcomes expected fewer than 5 times into one bin."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_acceptance_rule_on_synthetic_distributions():
    check_acceptance_rule("cpu")


def check_acceptance_rule(device) -> None:
    """sampling_accept's emitted tokens follow p, with p, q and the generator on `device`."""
    gen = torch.Generator(device).manual_seed(0)
    vocab, n, trials = 6, 3, 20000
    p = torch.softmax(torch.randn(n + 1, vocab, generator=gen, dtype=torch.float64, device=device) * 1.5, -1)
    q = torch.softmax(torch.randn(n, vocab, generator=gen, dtype=torch.float64, device=device) * 1.5, -1)
    first, second = np.zeros(vocab), np.zeros(vocab)
    all_drafts = torch.multinomial(q, trials, replacement=True, generator=gen).T  # [trials, n], row t ~ q
    for drafts, listed in zip(all_drafts, all_drafts.tolist()):
        n_acc, nxt = sampling_accept(drafts, q, p, gen)
        out = listed[:n_acc] + [nxt]
        first[out[0]] += 1
        if n_acc >= 1:  # the first draft was accepted; the second emitted token must follow p[1]
            second[out[1]] += 1
    p_cpu = p.cpu().numpy()
    assert chi_square_pvalue(first, p_cpu[0]) > ALPHA
    assert chi_square_pvalue(second, p_cpu[1]) > ALPHA
    # the test has power: drafts alone follow q, not p
    drafted = np.bincount(torch.multinomial(q[0], trials, replacement=True, generator=gen).cpu().numpy(),
                          minlength=vocab)
    assert chi_square_pvalue(drafted, p_cpu[0]) < ALPHA


@pytest.mark.heavy  # 1500 decodes each: tests/conftest.py spreads them over the xdist workers
@pytest.mark.parametrize("drafts", ["head", "ngram"])  # remembered drafts: tests/unit/test_batching.py
def test_decoder_samples_from_the_model_distribution(drafts):
    check_decoder_samples(drafts, "cpu")


def check_decoder_samples(drafts: str, device) -> None:
    """The decoder's first three sampled tokens follow the model's exact marginals, the model (and with
    it the decoder's per-request generators) on `device`."""
    model = tiny_llama(seed=2, vocab=32).to(device)
    split = SplitModel(model, 2)
    head = DrafterHead(split, HeadConfig(adapter_hidden=0, lora_rank=0)) if drafts == "head" else None
    transitions = []
    prompt, temperature, samples = [5, 9, 2, 30], 0.8, 1500  # each branch still runs > 300 times
    decoder = SelfSpecDecoder(split, head, LengthPolicy(3), CopySources(ngram=int(drafts == "ngram")),
                              sink=TransitionSink(transitions.append))
    if drafts == "ngram":  # copied drafts (q one-hot): the prompt repeats, with the model's own continuation between
        prompt = [*prompt, *plain_greedy(model, prompt, 4), *prompt]
    counts = np.zeros((3, 32))
    accepted = rejected = 0
    for seed in range(samples):
        result = decoder.generate(prompt, max_new_tokens=3, temperature=temperature, seed=seed, eos_ids=set())
        for i, tok in enumerate(result.tokens):
            counts[i, tok] += 1
        accepted += sum(r.accepted for r in result.rounds)
        rejected += sum(r.accepted < r.drafted for r in result.rounds)
    # exact marginals of the 1st, 2nd and 3rd sampled tokens, by enumerating every prefix
    with torch.no_grad():
        def next_probs(seqs):
            return torch.softmax(model(torch.tensor(seqs, device=model.device)).logits[:, -1] / temperature, -1).cpu()
        p1 = next_probs([prompt])[0]
        p2_given = next_probs([prompt + [a] for a in range(32)])  # [x1, x2]
        p3_given = next_probs([prompt + [a, b] for a in range(32) for b in range(32)]).view(32, 32, 32)
    joint12 = p1[:, None] * p2_given
    exact = [p1, joint12.sum(0), (joint12[:, :, None] * p3_given).sum((0, 1))]
    assert accepted > 300 and rejected > 300, "both rule branches must be exercised"
    for i in range(3):
        assert chi_square_pvalue(counts[i], exact[i].numpy()) > ALPHA, f"token {i + 1}"
    if head is None:  # copied drafts: rows of verifier targets, no head draft and no reward anywhere
        assert transitions and all(set(t.kind) <= {COPIED, PLAIN} and not t.on_path.any() for t in transitions)
        return
    # power: the drafter's own proposals for the 2nd token do not follow the model's distribution
    drafted = np.bincount([int(t.draft_tokens[0]) for t in transitions if t.kind[0] == DRAFTED], minlength=32)
    assert chi_square_pvalue(drafted, exact[1].numpy()) < ALPHA
