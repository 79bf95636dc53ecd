"""Objectives: each loss against numbers worked out by hand from its formula, gradients reach only the
head, the KL->RL schedule at and around every boundary, the clip and the baseline as documented."""
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from tiny_model import tiny_llama

from selfspec.drafter import DrafterHead, HeadConfig
from selfspec.engine import TransitionSink, SelfSpecDecoder
from selfspec.length_policy import LengthPolicy
from selfspec.objectives import (EMABaseline, LossConfig, Schedule, ScheduleConfig, TrainState, accepted_ce, collate,
                                 collate_for, distill_kl, make_schedule, policy_gradient, total_loss)
from selfspec.split import SplitModel
from selfspec.transitions import DRAFTED, Transition

F64 = torch.float64


def make_tr(draft, target, topk_ids, topk_lp, n_acc, draft_lp=None, temperature=0.0, d=2, version=0):
    """A hand-written transition: n drafted positions, verifier top-K given row by row."""
    n = len(draft)
    topk_ids, topk_lp = np.asarray(topk_ids, np.int32), np.asarray(topk_lp, np.float32)
    k = topk_ids.shape[1]
    draft = np.asarray(draft, np.int32)
    return Transition(
        run_id="t", actor_id=0, request_id="r", round=0, head_version=version, workload="hand",
        t_start=0.0, t_end=0.0, temperature=temperature, hidden=np.zeros((n, d), np.float16),
        draft_tokens=draft, draft_logprobs=np.asarray(draft_lp if draft_lp is not None else [-1.0] * n, np.float32),
        draft_topk_ids=np.repeat(draft[:, None], k, 1), draft_topk_logprobs=np.full((n, k), -1.0, np.float32),
        target_topk_ids=topk_ids, target_topk_logprobs=topk_lp, target_tokens=np.asarray(target, np.int32),
        accept_mask=np.arange(n) < n_acc, on_path=np.arange(n) <= n_acc, kind=np.zeros(n, np.int8)).validate()


def softmax(z):
    e = [math.exp(x) for x in z]
    return [x / sum(e) for x in e]


def leaf(rows):
    return torch.tensor(rows, dtype=F64, requires_grad=True)


# ---------------------------------------------------------------- distillation KL

def test_kl_rest_bucket_by_hand_value_and_gradient():
    z = [2.0, 1.0, 0.0, -1.0]
    batch = collate([make_tr([1], [1], [[1, 0]], [[math.log(0.5), math.log(0.3)]], 1)], dtype=F64)
    logits = leaf([z])
    loss, m = distill_kl(logits, batch)
    q = softmax(z)
    q_rest = q[2] + q[3]
    expected = 0.5 * math.log(0.5 / q[1]) + 0.3 * math.log(0.3 / q[0]) + 0.2 * math.log(0.2 / q_rest)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["charts/kl_tail_mass"] == pytest.approx(0.2, abs=1e-6)
    loss.backward()
    # d KL / d z_j = q_j - (teacher mass of j's bucket) * q_j / (drafter mass of j's bucket)
    grad = [q[0] - 0.3, q[1] - 0.5, q[2] - 0.2 * q[2] / q_rest, q[3] - 0.2 * q[3] / q_rest]
    np.testing.assert_allclose(logits.grad[0].numpy(), grad, atol=1e-6)


def test_kl_reduced_vocab_top_k_ids_outside_join_the_rest_bucket():
    vocab_ids = torch.tensor([0, 2, 5, 7])  # draft index -> full id
    # verifier top-3 = full ids 5 (0.5), 3 (0.2, not in the draft vocab), 7 (0.1); tail beyond K 0.2
    tr = make_tr([5], [5], [[5, 3, 7]], [[math.log(0.5), math.log(0.2), math.log(0.1)]], 1)
    batch = collate([tr], vocab_ids=vocab_ids, dtype=F64)
    assert batch.topk_valid.tolist() == [[True, False, True]] and batch.topk_idx[0, [0, 2]].tolist() == [2, 3]
    z = [0.3, -0.2, 1.1, 0.4]
    loss, m = distill_kl(leaf([z]), batch)
    q = softmax(z)
    expected = 0.5 * math.log(0.5 / q[2]) + 0.1 * math.log(0.1 / q[3]) + 0.4 * math.log(0.4 / (q[0] + q[1]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["charts/kl_tail_mass"] == pytest.approx(0.4, abs=1e-6)


def test_kl_distillation_temperature_tempers_both_sides_and_scales_by_t_squared():
    z = [2.0, 1.0, 0.0, -1.0]
    batch = collate([make_tr([1], [1], [[1, 0]], [[math.log(0.5), math.log(0.3)]], 1)], dtype=F64)
    loss, _ = distill_kl(leaf([z]), batch, temperature=2.0)
    atoms = [0.5 ** 0.5, 0.3 ** 0.5, 0.2 ** 0.5]  # the rest bucket tempered as one atom
    p = [a / sum(atoms) for a in atoms]
    q = softmax([x / 2 for x in z])
    expected = 4 * (p[0] * math.log(p[0] / q[1]) + p[1] * math.log(p[1] / q[0]) + p[2] * math.log(p[2] / (q[2] + q[3])))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_kl_sampling_temperature_scales_the_drafter_logits():
    z = [2.0, 1.0, 0.0, -1.0]
    tr = make_tr([1], [1], [[1, 0]], [[math.log(0.5), math.log(0.3)]], 1, temperature=0.5)
    loss, _ = distill_kl(leaf([z]), collate([tr], dtype=F64))
    q = softmax([x / 0.5 for x in z])
    expected = 0.5 * math.log(0.5 / q[1]) + 0.3 * math.log(0.3 / q[0]) + 0.2 * math.log(0.2 / (q[2] + q[3]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_kl_without_rest_bucket_is_the_full_kl_or_renormalised_and_never_nan():
    z = [0.5, -0.5, 1.5, 0.0]
    p = [0.4, 0.3, 0.2, 0.1]
    q = softmax(z)
    full = collate([make_tr([0], [0], [[0, 1, 2, 3]], [[math.log(x) for x in p]], 1)], dtype=F64)
    logits = leaf([z])
    loss, _ = distill_kl(logits, full)
    assert loss.item() == pytest.approx(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)), abs=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # every draft id is in the top-K but 0.3 of the verifier's mass is on ids the drafter lacks (6, 9):
    # no bucket can hold it, so the in-vocab atoms are renormalised
    vocab_ids = torch.tensor([0, 1, 2, 3])
    tr = make_tr([0], [0], [[0, 6, 1, 9, 2, 3]], [[math.log(x) for x in (0.3, 0.2, 0.2, 0.1, 0.1, 0.1)]], 1)
    logits = leaf([z])
    loss, _ = distill_kl(logits, collate([tr], vocab_ids=vocab_ids, dtype=F64))
    pr = [0.3 / 0.7, 0.2 / 0.7, 0.1 / 0.7, 0.1 / 0.7]
    assert loss.item() == pytest.approx(sum(pi * math.log(pi / qi) for pi, qi in zip(pr, q)), abs=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- reward-masked CE

def test_ce_by_hand_accepted_positions_only():
    a = make_tr([0, 1], [0, 3], [[0, 1]] * 2, [[-0.5, -1.5]] * 2, n_acc=1)  # pos 1 rejected: no CE
    b = make_tr([2], [2], [[2, 1]], [[-0.5, -1.5]], n_acc=1, temperature=0.5)
    z = [[1.0, 0.0, -1.0, 0.5], [0.2, 0.1, 0.0, -0.3], [0.0, 0.4, 0.7, -0.2]]
    logits = leaf(z)
    loss, m = accepted_ce(logits, collate([a, b], dtype=F64))
    q0, q2 = softmax(z[0]), softmax([x / 0.5 for x in z[2]])
    assert loss.item() == pytest.approx((-math.log(q0[0]) - math.log(q2[2])) / 2, abs=1e-9)
    assert m["charts/ce_positions"] == 2
    loss.backward()
    np.testing.assert_allclose(logits.grad[0].numpy(), [(q0[0] - 1) / 2, q0[1] / 2, q0[2] / 2, q0[3] / 2], atol=1e-9)
    assert torch.all(logits.grad[1] == 0)
    np.testing.assert_allclose(logits.grad[2].numpy(), [(q - (j == 2)) / 2 / 0.5 for j, q in enumerate(q2)], atol=1e-9)


def test_ce_with_no_accepted_position_is_zero_without_nan():
    trs = [make_tr([0, 1], [2, 3], [[2, 3]] * 2, [[-0.5, -1.5]] * 2, n_acc=0)]
    logits = leaf([[1.0, 0.0, -1.0, 0.5], [0.2, 0.1, 0.0, -0.3]])
    loss, m = accepted_ce(logits, collate(trs, dtype=F64))
    assert loss.item() == 0.0 and m["charts/ce_positions"] == 0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_ce_ignores_targets_outside_the_draft_vocab():
    vocab_ids = torch.tensor([0, 2, 5, 7])
    trs = [make_tr([5, 7], [5, 3], [[5, 3]] * 2, [[-0.5, -1.5]] * 2, n_acc=2)]  # target 3 is not a draft id
    batch = collate(trs, vocab_ids=vocab_ids, dtype=F64)
    assert batch.target_in_vocab.tolist() == [True, False] and batch.target_idx[0].item() == 2
    z = [[0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 1.0]]
    loss, m = accepted_ce(leaf(z), batch)
    assert loss.item() == pytest.approx(-math.log(softmax(z[0])[2]), abs=1e-9)
    assert m["charts/ce_positions"] == 1


# ---------------------------------------------------------------- policy gradient

def test_pg_by_hand_with_ppo_clip():
    z = [[1.0, 0.0, -1.0, 0.5], [0.2, 0.1, 0.0, -0.3], [0.0, 0.4, 0.7, -0.2], [0.3, -0.1, 0.2, 0.0],
         [0.0, 0.0, 0.0, 0.0]]
    acts = [0, 1, 2, 3, 1]
    ratios = [1.0, 1.5, 0.5, 2.0, 3.0]  # pi_current / pi_behaviour wanted at each position
    q = [softmax(r) for r in z]
    behaviour = [math.log(q[i][a]) - math.log(ratios[i]) for i, a in enumerate(acts)]
    # round 1 accepts 2 of 3 (third is the first reject); round 2 rejects its first, the second is off-path
    a = make_tr(acts[:3], acts[:2] + [0], [[0, 1]] * 3, [[-0.5, -1.5]] * 3, n_acc=2, draft_lp=behaviour[:3])
    b = make_tr(acts[3:], [0, 0], [[0, 1]] * 2, [[-0.5, -1.5]] * 2, n_acc=0, draft_lp=behaviour[3:])
    logits = leaf(z)
    loss, m = policy_gradient(logits, collate([a, b], dtype=F64), baseline=0.25, clip_eps=0.2)
    # A = r - 0.25; per position min(rho*A, clip(rho)*A):
    #   1.0 * 0.75 | min(1.5, 1.2) * 0.75 = 0.9 (clipped) | -0.25 * max(0.5, 0.8) = -0.2 (clipped)
    #   -0.25 * max(2.0, 1.2) = -0.5 (unclipped) | off-path: excluded
    assert loss.item() == pytest.approx(-(0.75 + 0.9 - 0.2 - 0.5) / 4, abs=1e-6)
    assert m["charts/importance_ratio_mean"] == pytest.approx((1.0 + 1.5 + 0.5 + 2.0) / 4, abs=1e-6)
    assert m["charts/clip_fraction"] == pytest.approx(3 / 4)
    assert m["charts/pg_positions"] == 4
    loss.backward()
    g = logits.grad.numpy()
    # unclipped: d/dz of -(rho*A)/4 = -(A*rho/4) * (onehot(a) - q)
    np.testing.assert_allclose(g[0], [-(0.75 * 1.0 / 4) * ((j == 0) - q[0][j]) for j in range(4)], atol=1e-6)
    np.testing.assert_allclose(g[3], [-(-0.25 * 2.0 / 4) * ((j == 3) - q[3][j]) for j in range(4)], atol=1e-6)
    # clipped positions and the off-path one give nothing
    assert np.all(g[1] == 0) and np.all(g[2] == 0) and np.all(g[4] == 0)


def test_pg_ratio_inside_clip_range_is_plain_reinforce():
    z = [[0.4, -0.3, 0.1, 0.0]]
    q = softmax(z[0])
    tr = make_tr([2], [2], [[2, 0]], [[-0.5, -1.5]], n_acc=1, draft_lp=[math.log(q[2]) - math.log(1.1)])
    logits = leaf(z)
    loss, m = policy_gradient(logits, collate([tr], dtype=F64), baseline=0.6, clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.1 * 0.4, abs=1e-6) and m["charts/clip_fraction"] == 0
    loss.backward()
    np.testing.assert_allclose(logits.grad[0].numpy(), [-0.4 * 1.1 * ((j == 2) - q[j]) for j in range(4)], atol=1e-6)


def test_baseline_is_a_bias_corrected_ema():
    b = EMABaseline(decay=0.5, init=0.3)
    assert b.value == 0.3
    b.update(1.0)
    assert b.value == pytest.approx(1.0)  # first update: exactly that batch's mean
    b.update(0.0)
    assert b.value == pytest.approx((0.5 * 0.5 * 1.0 + 0.5 * 0.0) / (1 - 0.25))
    c = EMABaseline()
    c.load_state_dict(b.state_dict())
    assert c.value == b.value
    last = EMABaseline(decay=0.0)
    last.update(0.2), last.update(0.7)
    assert last.value == pytest.approx(0.7)
    with pytest.raises(ValueError, match="decay"):
        EMABaseline(decay=1.0)


# ---------------------------------------------------------------- schedule

def test_schedule_weights_at_and_around_every_boundary():
    s = Schedule(ScheduleConfig(warmup_steps=10, ramp_steps=4, kl_weight=2.0, kl_floor=0.25, ce_weight=1.0,
                                pg_weight=0.5))
    expect = {0: (2.0, 0.0, 0.0, "warmup"), 9: (2.0, 0.0, 0.0, "warmup"),
              10: (2.0, 0.0, 0.0, "ramp"),  # the ramp starts at progress 0
              11: (2.0 * (1 - 0.25 * 0.75), 0.25, 0.125, "ramp"),
              12: (2.0 * (1 - 0.5 * 0.75), 0.5, 0.25, "ramp"),
              13: (2.0 * (1 - 0.75 * 0.75), 0.75, 0.375, "ramp"),
              14: (0.5, 1.0, 0.5, "rl"), 15: (0.5, 1.0, 0.5, "rl"), 10_000: (0.5, 1.0, 0.5, "rl")}
    for step, (kl, ce, pg, phase) in expect.items():
        w = s.weights(step)
        assert (w.kl, w.ce, w.pg, w.phase) == (pytest.approx(kl), pytest.approx(ce), pytest.approx(pg), phase), step
    assert s.weights().phase == "warmup"
    s.advance(9)
    assert s.weights().phase == "warmup"
    s.advance()
    assert s.step == 10 and s.weights().phase == "ramp"
    restored = Schedule()
    restored.load_state_dict(s.state_dict())
    assert restored.step == 10 and restored.weights() == s.weights()


def test_schedule_without_ramp_switches_at_the_warmup_boundary():
    s = Schedule(ScheduleConfig(warmup_steps=3, ramp_steps=0, kl_weight=1.0, kl_floor=0.0))
    assert (s.weights(2).kl, s.weights(2).ce) == (1.0, 0.0)
    assert (s.weights(3).kl, s.weights(3).ce, s.weights(3).pg, s.weights(3).phase) == (0.0, 1.0, 1.0, "rl")


def kcp(w):
    return (w.kl, w.ce, w.pg)


def test_named_schedules():
    cfg = ScheduleConfig(warmup_steps=5, ramp_steps=5, kl_weight=2.0, kl_floor=0.1, ce_weight=3.0, pg_weight=4.0)
    for step in (0, 7, 100):
        assert kcp(make_schedule("kl_only", cfg).weights(step)) == (2.0, 0.0, 0.0)
        assert kcp(make_schedule("ce_only", cfg).weights(step)) == (0.0, 3.0, 0.0)
        assert kcp(make_schedule("pg_only", cfg).weights(step)) == (0.0, 0.0, 4.0)
    kl_rl = make_schedule("kl_rl", {"warmup_steps": 5, "ramp_steps": 5, "kl_floor": 0.1})
    assert kl_rl.config.warmup_steps == 5 and kcp(kl_rl.weights(10)) == (pytest.approx(0.1), 1.0, 1.0)
    with pytest.raises(ValueError, match="kl_rl, kl_only, ce_only, pg_only"):
        make_schedule("rl_only")


@pytest.mark.parametrize("bad, key", [({"warmup_steps": -1}, "warmup_steps"), ({"ramp_steps": -5}, "ramp_steps"),
                                      ({"kl_floor": 1.5}, "kl_floor"), ({"pg_weight": -0.1}, "pg_weight"),
                                      ({"ce_weigth": 1.0}, "ce_weigth")])
def test_bad_schedule_config_names_the_key(bad, key):
    with pytest.raises(ValidationError) as info:
        ScheduleConfig(**bad)
    assert info.value.errors()[0]["loc"] == (key,)
    with pytest.raises(ValidationError, match=key):
        make_schedule("kl_rl", bad)


# ---------------------------------------------------------------- collate

def test_collate_flattens_pads_top_k_and_maps_temperature():
    a = make_tr([0, 1], [0, 3], [[0, 1]] * 2, [[-0.5, -1.5]] * 2, n_acc=1, temperature=0.7, version=3)
    b = make_tr([2], [2], [[2, 1, 0]], [[-0.5, -1.5, -2.0]], n_acc=1, version=4)
    batch = collate([a, b], dtype=F64)
    assert len(batch) == 3 and batch.rounds == 2 and batch.hidden.dtype == F64
    assert batch.tau.tolist() == [0.7, 0.7, 1.0] and batch.head_version.tolist() == [3, 3, 4]
    assert batch.topk_valid.tolist() == [[True, True, False], [True, True, False], [True, True, True]]
    assert batch.topk_logprobs[0, 2].item() == -math.inf
    assert batch.accepted.tolist() == [True, False, True] and batch.on_path.tolist() == [True, True, True]
    with pytest.raises(ValueError, match="no transitions"):
        collate([])


# ---------------------------------------------------------------- with a real head on a tiny model

@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3)


_decoded = {}


def real_transitions(draft_vocab, attention=False):
    """Transitions from decoding with a fresh head of this vocabulary (cached: an untrained head of a
    given config drafts the same whatever its instance, adapter and LoRA starting at zero)."""
    if (draft_vocab, attention) not in _decoded:
        model = tiny_llama(seed=3)
        split = SplitModel(model, 2)
        head = DrafterHead(split, head_config(draft_vocab, attention))
        topk = model.config.vocab_size if draft_vocab is None else 8  # full vocab: the KL is exact
        out = []
        SelfSpecDecoder(split, head, LengthPolicy(4), sink=TransitionSink(out.append, topk=topk)).generate(
            [5, 9, 2, 7, 11, 4], max_new_tokens=24, eos_ids=set())
        _decoded[draft_vocab, attention] = out
    return _decoded[draft_vocab, attention]


def head_config(draft_vocab=None, attention=False):
    return HeadConfig(adapter_hidden=8, lora_rank=2, draft_vocab=draft_vocab,
                      attention_layers=int(attention), context_window=4 * attention)


def perturb_trainable(head, seed=0):
    # zero-initialised adapter output and LoRA B would leave other params gradient-free at init
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("draft_vocab,attention", [(None, False), (64, False), (None, True)])
def test_gradients_reach_only_head_parameters(draft_vocab, attention):
    model = tiny_llama(seed=3).requires_grad_(True)  # trainable on purpose: nothing may flow into it
    split = SplitModel(model, 2)
    head = DrafterHead(split, head_config(draft_vocab, attention))
    transitions = real_transitions(draft_vocab, attention)
    perturb_trainable(head)
    schedule = Schedule(ScheduleConfig(warmup_steps=0, ramp_steps=0, kl_floor=0.5))  # all three losses on
    loss, m = total_loss(head, collate_for(head, transitions), TrainState(schedule, EMABaseline(init=0.5)))
    assert m["charts/kl_weight"] > 0 and m["charts/ce_weight"] > 0 and m["charts/pg_weight"] > 0
    loss.backward()
    trainable = {n: p for n, p in head.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any(n.startswith("adapter.") for n in trainable)
    assert attention == any(n.startswith("layers.") for n in trainable)
    for name, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    frozen = [n for n, p in head.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in head.parameters() if not p.requires_grad), frozen
    for name, p in model.named_parameters():
        assert p.grad is None, name


def test_real_transitions_fresh_ratio_is_one_and_kl_matches_full_kl(model):
    split = SplitModel(model, 2)
    head = DrafterHead(split, HeadConfig(adapter_hidden=8, lora_rank=2))
    transitions = real_transitions(None)  # top-K = whole vocabulary: the KL is exact
    assert transitions[0].target_topk_ids.shape[1] == model.config.vocab_size
    batch = collate_for(head, transitions)
    with torch.no_grad():
        logits = head(batch.hidden)
        _, m = policy_gradient(logits, batch, baseline=0.5)
        kl, m_kl = distill_kl(logits, batch)
    # on-policy: only float16 storage of the hidden state separates behaviour from current
    assert m["charts/importance_ratio_mean"] == pytest.approx(1.0, abs=2e-2) and m["charts/clip_fraction"] == 0
    assert m_kl["charts/kl_tail_mass"] < 1e-5
    ids = np.concatenate([tr.target_topk_ids for tr in transitions])
    logp = np.concatenate([tr.target_topk_logprobs for tr in transitions]).astype(np.float64)
    logq = torch.log_softmax(logits, -1).numpy()
    full = np.mean([np.sum(np.exp(lp) * (lp - logq[i, row])) for i, (row, lp) in enumerate(zip(ids, logp))])
    assert kl.item() == pytest.approx(full, rel=1e-4, abs=1e-6)


def test_total_loss_is_the_weighted_sum_and_updates_the_baseline_after_use(model):
    split = SplitModel(model, 2)
    head = DrafterHead(split, HeadConfig(adapter_hidden=8, lora_rank=2, draft_vocab=64))
    transitions = real_transitions(64)
    batch = collate_for(head, transitions)
    # what the head drafted is always in its own vocabulary; the rows nothing drafted have no draft
    drafted = np.concatenate([t.kind for t in transitions]) == DRAFTED
    assert drafted.any() and (batch.draft_in_vocab.numpy() == drafted).all()
    schedule = Schedule(ScheduleConfig(warmup_steps=2, ramp_steps=4, kl_weight=1.0, kl_floor=0.2,
                                       ce_weight=0.5, pg_weight=2.0), step=4)
    baseline, cfg = EMABaseline(decay=0.9, init=0.3), LossConfig(distill_temperature=1.5, clip_eps=0.1)
    loss, m = total_loss(head, batch, TrainState(schedule, baseline), cfg)
    with torch.no_grad():
        logits = head(batch.hidden)
        kl, _ = distill_kl(logits, batch, 1.5)
        ce, _ = accepted_ce(logits, batch)
        pg, _ = policy_gradient(logits, batch, 0.3, 0.1)
    w_kl, w_ce, w_pg = 1.0 * (1 - 0.5 * 0.8), 0.25, 1.0  # mid-ramp (progress 2/4)
    assert (m["charts/kl_weight"], m["charts/ce_weight"], m["charts/pg_weight"]) == pytest.approx((w_kl, w_ce, w_pg))
    assert loss.item() == pytest.approx(w_kl * kl.item() + w_ce * ce.item() + w_pg * pg.item(), rel=1e-6)
    on_path = batch.on_path
    rate = batch.accepted[on_path].double().mean().item()
    assert m["charts/baseline"] == 0.3 and m["charts/accept_rate"] == pytest.approx(rate)
    assert 0 < rate < 1 and baseline.value == pytest.approx(rate)  # first update: the batch's own rate
    assert schedule.step == 4  # total_loss never advances the schedule
    before = baseline.state_dict()
    total_loss(head, batch, TrainState(schedule, baseline), cfg, update_baseline=False)
    assert baseline.state_dict() == before
    for key in ("losses/kl", "losses/ce", "losses/pg", "charts/importance_ratio_mean", "charts/clip_fraction",
                "charts/agreement", "charts/accepted_per_round"):
        assert math.isfinite(m[key]), key
