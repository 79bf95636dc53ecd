"""Continuous batching with per-sequence speculation (issue 29): every row of a batch decodes what it decodes
alone. Greedy rows are plain greedy decoding whatever joins and leaves around them; sampled rows follow the
model's distribution and a seeded one repeats; each row emits its own transition every round; the static
passes batch like the eager ones. The Batcher: test_batcher.py."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from batch_cases import make_decoder, model_fixture, reference_fixture, seeded_head  # noqa: F401 - fixtures
from test_sampling import ALPHA, chi_square_pvalue
from tiny_model import make_length_policy, plain_greedy, plain_greedy_batch, tiny_llama

from selfspec.copy_sources import CopySources
from selfspec.drafter import DrafterHead, HeadConfig
from selfspec.engine import SelfSpecDecoder, Sequence, TransitionSink
from selfspec.prefill_groups import PREFILL_TOKENS, prefill_groups
from selfspec.request import DecodeOptions
from selfspec.length_policy import LengthPolicy
from selfspec.passes import StaticPasses, pass_runner
from selfspec.split import SplitModel
from selfspec.suffix_index import SuffixIndex, SuffixIndexConfig
from selfspec.transitions import ARRAY_FIELDS, COPIED, DRAFTED, PLAIN, REMEMBERED



@dataclass
class Run:
    seqs: list[Sequence]
    sizes: list[int] = field(default_factory=list)  # each round's batch size
    steps: list[list[tuple[str, int]]] = field(default_factory=list)  # each round's rows: (request_id, its round)
    eos_beside_others: int = 0  # requests that ended by EOS in a round after which others went on


def decode_batched(decoder: SelfSpecDecoder, requests: list[tuple[list[int], dict]], max_batch: int,
                   seed: int = 0, most: int = 2) -> Run:
    """Continuous batching by hand, on join/join_all/step: before each step() 0 to `most` waiting requests join
    (at least one into an empty batch; several at once prefill together) while there is room, so requests join
    and leave at different rounds. Checks what a step
    promises: one (sequence, new tokens) per row in slot order, the new tokens at the end of its result,
    the rows still in the batch in the first slots."""
    rng = np.random.default_rng(seed)
    waiting = list(enumerate(requests))
    run = Run([None] * len(requests))
    while waiting or decoder.batch:
        joining = waiting[:min(int(rng.integers(0 if decoder.batch else 1, most + 1)), max_batch - len(decoder.batch))]
        del waiting[:len(joining)]
        if len(joining) == 1:
            i, (prompt, options) = joining[0]
            run.seqs[i] = decoder.join(prompt, **options)
        elif joining:  # their prefills batched
            for (i, _), seq in zip(joining, decoder.join_all([(p, DecodeOptions(**o)) for _, (p, o) in joining])):
                run.seqs[i] = seq
        for i, _ in joining:
            assert run.seqs[i].finished == (run.seqs[i] not in decoder.batch)
        if not decoder.batch:
            continue
        before = list(decoder.batch)
        stepped = decoder.step()
        assert [s for s, _ in stepped] == before
        assert [s.slot for s in decoder.batch] == list(range(len(decoder.batch)))
        assert all(not s.finished for s in decoder.batch) and all(s.finished for s in before if s not in decoder.batch)
        for seq, new in stepped:
            assert new and seq.result.tokens[-len(new):] == new
            assert seq.result.rounds[-1].batch == len(before)
            run.eos_beside_others += seq.finished and seq.result.stop_reason == "eos" and bool(decoder.batch)
        run.sizes.append(len(before))
        run.steps.append([(s.options.request_id, s.rounds) for s in before])
    return run


def drafting_counts(results) -> tuple[int, int, int]:
    """(drafts verified, accepted, rounds with a reject) over the results' rounds."""
    rounds = [r for res in results for r in res.rounds]
    return (sum(r.drafted for r in rounds), sum(r.accepted for r in rounds),
            sum(r.accepted < r.drafted for r in rounds))


# (exit layer k, gamma, policy, head noise (None: no head), draft vocab, (attention layers, window), ngram)
SETTINGS = [
    (2, 4, "fixed", 0.05, None, None, 0),
    (3, 4, "cost_aware", 0.05, None, None, 0),
    (2, 5, "threshold", 0.0, None, None, 0),
    (3, 5, "fixed", 0.0, 64, None, 0),  # a draft vocabulary
    (1, 5, "fixed", 0.05, None, (2, 16), 0),  # an attention head
    (1, 5, "cost_aware", 0.05, 64, (2, 16), 0),
    (2, 4, "fixed", None, None, None, 1),  # copied drafts without a head
    (2, 4, "cost_aware", 0.05, None, None, 1),  # copies, and the head where none matches
    (2, 4, "fixed", 0.05, None, (1, 3), 1),
    (2, 0, "fixed", None, None, None, 0),  # γ=0: plain batched decoding
]


@pytest.mark.parametrize("k,gamma,policy,noise,vocab,attention,ngram", SETTINGS)
def test_every_row_is_plain_greedy(model, reference, k, gamma, policy, noise, vocab, attention, ngram):
    """Each row of a batch whose rows join and leave at different rounds is plain greedy decoding, and what
    the request decodes alone; where the length policy's decisions do not depend on the batch (fixed,
    threshold), the rounds are the same too: speculation is per sequence."""
    decoder = make_decoder(model, k, gamma, policy, noise, vocab, attention, copies=CopySources(ngram))
    run = decode_batched(decoder, [(p, o) for p, o, _ in reference], max_batch=4, seed=k * 10 + gamma)
    alone = make_decoder(model, k, gamma, policy, noise, vocab, attention, copies=CopySources(ngram))
    for seq, (prompt, options, expected) in zip(run.seqs, reference, strict=True):
        assert seq.finished
        assert seq.result.tokens == expected, f"prompt={prompt} {options}"
        single = alone.generate(prompt, **options)
        assert single.tokens == expected and seq.result.stop_reason == single.stop_reason
        if policy != "cost_aware":
            rounds = [(r.drafted, r.accepted) for r in seq.result.rounds]
            assert rounds == [(r.drafted, r.accepted) for r in single.rounds]
    assert max(run.sizes) == 4 and min(run.sizes) < 4
    assert any(len({r.batch for r in s.result.rounds}) > 1 for s in run.seqs), "no row saw the batch change"
    assert run.eos_beside_others > 0, "no row ended by EOS while others went on"
    drafted, accepted, rejected = drafting_counts(s.result for s in run.seqs)
    if gamma:
        assert drafted > 0 and accepted > 0 and rejected > 0
    else:
        assert drafted == 0



@pytest.mark.parametrize("policy,noise,ngram", [("fixed", None, 0), ("cost_aware", 0.05, 1)])
def test_rows_drafting_from_a_traffic_memory_are_plain_greedy(model, reference, policy, noise, ngram):
    """A traffic memory holding earlier responses (the right continuation of half the requests, the wrong one
    of others: another request's run after their prompt) drafts beside the request's own text and the head;
    every row is still plain greedy, and remembered drafts were verified, some accepted, some rejected."""
    rng = np.random.default_rng(30)
    memory = SuffixIndex(SuffixIndexConfig(min_match=1))
    for i, (prompt, _, expected) in enumerate(reference):
        memory.insert([*prompt, *(expected if i % 2 else reference[(i + 5) % len(reference)][2])])
        memory.insert(rng.integers(0, 256, 20).tolist())
    decoder = make_decoder(model, 2, 4, policy, noise, copies=CopySources(ngram=ngram, memory=memory))
    run = decode_batched(decoder, [(p, o) for p, o, _ in reference], max_batch=4)
    for seq, (prompt, options, expected) in zip(run.seqs, reference, strict=True):
        assert seq.result.tokens == expected, f"prompt={prompt} {options}"
    remembered = [r for s in run.seqs for r in s.result.rounds if r.kind == "remembered"]
    assert sum(r.accepted for r in remembered) > 0 and any(r.accepted < r.drafted for r in remembered)

def test_eos_inside_a_draft_ends_its_row_only(model):
    """Rows of one prompt, each with its own EOS (the k-th token of the greedy run), one with none: a good
    head drafts past most of them, so the round is cut at the EOS for that row only."""
    prompt = [17, 3, 99, 42, 8]
    run_ = plain_greedy(model, prompt, 30)
    # EOS candidates: tokens first emitted by a round (not prefill), each at its first occurrence
    eos_tokens = [t for j, t in enumerate(run_[:12]) if j > 0 and t not in run_[:j]]
    requests = [(prompt, dict(max_new_tokens=30, eos_ids=eos)) for eos in [*({t} for t in eos_tokens), set()]]
    decoder = make_decoder(model, 3, 5, "fixed", 0.0, copies=CopySources(ngram=1))
    run = decode_batched(decoder, requests, max_batch=len(requests), most=len(requests))  # all join at once
    cut_short = 0
    for seq, t in zip(run.seqs, eos_tokens):
        assert seq.result.tokens == run_[:run_.index(t) + 1] and seq.result.stop_reason == "eos"
        cut_short += 1 + sum(r.accepted + 1 for r in seq.result.rounds) > len(seq.result.tokens)
    assert run.seqs[-1].result.tokens == run_ and run.seqs[-1].result.stop_reason == "length"
    assert len(eos_tokens) >= 4 and cut_short > 0 and run.eos_beside_others == len(eos_tokens)


def test_prefill_groups_batch_prompts_of_similar_length():
    """Short prompts share a pass (padding them costs less than another pass), one far longer than the rest
    prefills alone, and a pass stays within PREFILL_TOKENS."""
    assert prefill_groups([5, 9, 3]) == [[2, 0, 1]]
    assert prefill_groups([400, 40, 420, 30]) == [[3, 1], [0, 2]]  # 2 x 40 wastes 10; 40 and 400 would waste 360
    assert prefill_groups([PREFILL_TOKENS // 2 + 1] * 2) == [[0], [1]]
    assert prefill_groups([]) == []


def test_prompts_joining_together_prefill_in_one_pass(model, reference):
    """join_all of short prompts runs one trunk pass and one verify pass for all of them, and every row is
    still plain greedy (one of them ending at its prefill)."""
    cases = [reference[i] for i in (0, 3, 5, 6)]  # 3: max_new 1, it ends at its prefill
    decoder = make_decoder(model, 2, 4, "fixed", 0.05, copies=CopySources(ngram=1))
    calls = []
    trunk, verify = decoder.passes.trunk, decoder.passes.verify
    decoder.passes.trunk = lambda *a, **kw: calls.append("trunk") or trunk(*a, **kw)
    decoder.passes.verify = lambda *a, **kw: calls.append("verify") or verify(*a, **kw)
    seqs = decoder.join_all([(p, DecodeOptions(**o)) for p, o, _ in cases])
    assert calls == ["trunk", "verify"] and len(prefill_groups([len(p) for p, _, _ in cases])) == 1
    assert seqs[1].finished and [s for s in seqs if not s.finished] == decoder.batch
    while decoder.batch:
        decoder.step()
    for seq, (prompt, options, expected) in zip(seqs, cases, strict=True):
        assert seq.result.tokens == expected, f"prompt={prompt} {options}"


def test_a_bad_request_joins_nothing(model, reference):
    """join_all checks every request before any prefill: one bad request, and none of them joins."""
    decoder = make_decoder(model, 2, 4, "fixed", 0.05)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.join_all([(reference[0][0], DecodeOptions()), (reference[1][0], DecodeOptions(max_new_tokens=0))])
    assert decoder.batch == []


def test_join_and_leave_between_steps(model, reference):
    """Sequences join between step() calls and one leaves in the middle of the batch (the last moves into its
    slot): every other row stays plain greedy; the one that left keeps a prefix of its run."""
    pa, pb, pc = (reference[i][0] for i in (0, 4, 6))
    pd, od, ed = reference[8]
    ea, ec = plain_greedy_batch(model, [pa, pc], [40, 30])
    decoder = make_decoder(model, 2, 4, "fixed", 0.05, copies=CopySources(ngram=1))
    with pytest.raises(ValueError, match="empty prompt"):
        decoder.join([])
    a = decoder.join(pa, max_new_tokens=40, eos_ids=set())
    b = decoder.join(pb, max_new_tokens=60, eos_ids=set())
    decoder.step()
    c = decoder.join(pc, max_new_tokens=30, eos_ids=set())
    decoder.step()
    assert [s.slot for s in decoder.batch] == [0, 1, 2] and decoder.batch == [a, b, c]
    with pytest.raises(RuntimeError, match="decoding a batch"):
        decoder.generate([1, 2, 3], max_new_tokens=3)
    read = list(b.result.tokens)
    decoder.leave(b)  # abandoned in the middle slot: c moves into it
    assert b.finished and b.result.tokens == read and b.result.stop_reason == "length"
    assert decoder.batch == [a, c] and c.slot == 1
    d = decoder.join(pd, **od)
    while decoder.batch:
        decoder.step()
        assert [s.slot for s in decoder.batch] == list(range(len(decoder.batch)))
    assert (a.result.tokens, c.result.tokens, d.result.tokens) == (ea, ec, ed)
    assert read == plain_greedy(model, pb, len(read))
    # a request that stops ("stop") leaves with that reason; alone again, the decoder generates
    e = decoder.join(pa, max_new_tokens=20, eos_ids=set())
    decoder.step()
    decoder.leave(e, "stop")
    assert e.result.stop_reason == "stop" and not decoder.batch
    assert decoder.generate(pc, max_new_tokens=30, eos_ids=set()).tokens == ec


# ---- sampling ----

TEMPERATURE = 0.8


def exact_marginals(model, prompt: list[int], vocab: int) -> list[np.ndarray]:
    """The model's exact marginals of the 1st, 2nd and 3rd sampled tokens after `prompt`."""
    with torch.no_grad():
        def next_probs(seqs):
            return torch.softmax(model(torch.tensor(seqs)).logits[:, -1] / TEMPERATURE, -1)
        p1 = next_probs([prompt])[0]
        p2_given = next_probs([prompt + [a] for a in range(vocab)])
        p3_given = next_probs([prompt + [a, b] for a in range(vocab) for b in range(vocab)]).view(vocab, vocab, vocab)
    joint12 = p1[:, None] * p2_given
    return [p.numpy() for p in (p1, joint12.sum(0), (joint12[:, :, None] * p3_given).sum((0, 1)))]


def test_sampled_rows_follow_the_model_distribution():
    """Two prompts decoded in one batch of 8 (rows joining as others finish, each with its own seed): each
    row's first three sampled tokens follow its own prompt's exact marginals (chi-square, fixed seeds),
    through the head's drafts, copied ones and remembered ones (a traffic memory holding the second prompt's
    greedy answer), each kind both accepted and rejected. The test tells the rows apart: one prompt's tokens
    do not fit the other's marginals."""
    vocab = 32
    model = tiny_llama(seed=2, vocab=vocab)
    split = SplitModel(model, 2)
    head = DrafterHead(split, HeadConfig(adapter_hidden=0, lora_rank=0))
    transitions = []
    a = [5, 9, 2, 30]
    b = [11, 4, 20]
    b = [*b, *plain_greedy(model, b, 4), *b]  # copies: the prompt repeats with the model's continuation between
    memory = SuffixIndex(SuffixIndexConfig(min_match=1))
    memory.insert([*b, *plain_greedy(model, b, 6)])  # an earlier answer to b
    decoder = SelfSpecDecoder(split, head, LengthPolicy(3), CopySources(ngram=1, memory=memory),
                              sink=TransitionSink(transitions.append))
    prompts, samples = (a, b), 800
    requests = [(prompts[s % 2], dict(max_new_tokens=3, temperature=TEMPERATURE, seed=s, eos_ids=set()))
                for s in range(2 * samples)]
    run = decode_batched(decoder, requests, max_batch=8, seed=2, most=8)
    assert np.mean(run.sizes) > 5
    counts = np.zeros((2, 3, vocab))
    for s, seq in enumerate(run.seqs):
        assert len(seq.result.tokens) == 3
        for i, tok in enumerate(seq.result.tokens):
            counts[s % 2, i, tok] += 1
    rounds = {s.options.request_id: s.result.rounds for s in run.seqs}
    for kind in (DRAFTED, COPIED, REMEMBERED):  # rounds of every kind of drafts, some accepted, some rejected
        verified = [rounds[t.request_id][t.round - 1] for t in transitions if t.kind[0] == kind]
        assert sum(r.accepted > 0 for r in verified) > 50 and sum(r.accepted < r.drafted for r in verified) > 50, kind
    exact = [exact_marginals(model, p, vocab) for p in prompts]
    for r in range(2):
        for i in range(3):
            assert chi_square_pvalue(counts[r, i], exact[r][i]) > ALPHA, f"prompt {r} token {i + 1}"
    for i in range(3):  # power: the rows are told apart
        assert chi_square_pvalue(counts[0, i], exact[1][i]) < ALPHA
        assert chi_square_pvalue(counts[1, i], exact[0][i]) < ALPHA


def test_seeded_sampled_rows_repeat(model, reference):
    """A seeded sampled request gives the same tokens twice in the same batch composition, and (fixed γ: its
    drafts and draws do not depend on the batch) the tokens it gives alone; greedy rows beside it stay greedy."""
    requests = [(reference[i][0], dict(max_new_tokens=24, temperature=t, seed=s, eos_ids=set()))
                for i, t, s in ((0, 0.7, 1), (5, 1.0, 2), (6, 1.3, 3), (1, 1.0, 4))]
    requests.append(reference[2][:2])
    first, second = (decode_batched(make_decoder(model, 2, 3, "fixed", 0.05, copies=CopySources(ngram=1)), requests, 3,
                                    seed=5)
                     for _ in range(2))
    assert [s.result.tokens for s in first.seqs] == [s.result.tokens for s in second.seqs]
    alone = make_decoder(model, 2, 3, "fixed", 0.05, copies=CopySources(ngram=1))
    for seq, (prompt, options) in zip(first.seqs, requests, strict=True):
        assert seq.result.tokens == alone.generate(prompt, **options).tokens
    assert first.seqs[-1].result.tokens == reference[2][2]
    assert len({tuple(s.result.tokens) for s in first.seqs}) == len(requests)
    drafted, accepted, rejected = drafting_counts(s.result for s in first.seqs[:-1])
    assert accepted > 0 and rejected > 0


# ---- transitions ----

def test_one_transition_per_row_per_round(model, reference):
    """A batched run emits, each round, one transition per row in slot order, with the row's request id and
    round index (and each request's prompt rows, round 0, when it joins); a request's transitions are the
    ones it emits alone (fixed γ)."""
    def decoder(out):
        return make_decoder(model, 2, 3, "fixed", 0.05, attention=(1, 4), copies=CopySources(ngram=1),
                            sink=TransitionSink(out.append, prompt_rows=2))
    requests = [(p, {**o, "request_id": f"r{i}"}) for i, (p, o, _) in enumerate(reference[:10])]
    batched = []
    run = decode_batched(decoder(batched), requests, max_batch=4, seed=3)
    assert [(t.request_id, t.round) for t in batched if t.round > 0] == [row for step in run.steps for row in step]
    for seq, (_, options) in zip(run.seqs, requests, strict=True):
        mine = [t.round for t in batched if t.request_id == options["request_id"]]
        assert mine == list(range(len(seq.result.rounds) + 1))
    alone = []
    single = decoder(alone)
    for prompt, options in requests:
        single.generate(prompt, **options)
    assert len(alone) == len(batched)
    by_request = {}
    for t in alone:
        by_request.setdefault(t.request_id, []).append(t)
    kinds = set()
    for t in batched:
        u = by_request[t.request_id].pop(0)
        for name in ("round", "head_version", "workload", "temperature", "run_id", "actor_id"):
            assert getattr(t, name) == getattr(u, name), name
        for name, (dtype, _) in ARRAY_FIELDS.items():
            x, y = getattr(t, name), getattr(u, name)
            assert x.shape == y.shape, name
            if dtype.kind == "f":
                assert np.allclose(x, y, rtol=2e-3, atol=2e-3), name
            else:
                assert (x == y).all(), name
        kinds.update(t.kind.tolist())
    assert {DRAFTED, COPIED, PLAIN} <= kinds


# ---- static passes ----

@pytest.mark.parametrize("k,gamma,policy,noise,vocab,attention,ngram", [
    (2, 4, "fixed", 0.05, None, None, 1),
    (1, 5, "cost_aware", 0.05, 64, (2, 16), 0),
])
def test_static_passes_decode_a_batch_like_eager(model, reference, k, gamma, policy, noise, vocab, attention, ngram):
    """The static-position passes (what CUDA graphs replay) decode a batch like the eager ones: the shared
    cache grows its slots while sequences are in flight, padding rows write past their own tokens."""
    split = SplitModel(model, k)
    static = pass_runner(split, "static")
    assert isinstance(static, StaticPasses)
    head = seeded_head(model, k, noise, vocab, attention)
    requests = [(p, o) for p, o, _ in reference]
    runs = {}
    for name, passes in (("eager", split), ("static", static)):
        decoder = SelfSpecDecoder(split, head, make_length_policy(policy, gamma), CopySources(ngram), passes=passes)
        runs[name] = decode_batched(decoder, requests, max_batch=4, seed=7)
    for e, s, (_, _, expected) in zip(runs["eager"].seqs, runs["static"].seqs, reference, strict=True):
        assert s.result.tokens == e.result.tokens == expected
    assert static.cache.slots >= 4
    assert drafting_counts(s.result for s in runs["static"].seqs)[0] > 0
