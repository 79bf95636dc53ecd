"""Training objectives for the drafter head, computed from Transition records plus the current head.

Pure torch + numpy so the in-process loop and a distributed learner share the code. Three losses:

- `distill_kl`: forward KL(p_verifier || p_drafter) over the stored verifier top-K, every position
  (positions after the first reject saw the same context as the verifier: valid targets, no reward);
- `accepted_ce`: cross-entropy toward the verifier's token on accepted positions (reward 1);
- `policy_gradient`: REINFORCE on the drafted tokens, reward = accepted, on-path positions only, with
  a running baseline and a PPO-clipped importance ratio pi_current / pi_behaviour.

All three read the head's distribution at the temperature the transition was drafted at (T=1 for
greedy), the same one `draft_logprobs` and `target_topk_logprobs` were stored at, so a fresh
transition has importance ratio 1 and the KL compares like with like.

Reduced draft vocabulary: ids are mapped to draft indices in `collate`. A verifier top-K id outside
the draft vocabulary joins the KL's rest bucket (the drafter can never put mass on it); a target
token outside it is left out of the CE, a drafted token outside it (another head's vocabulary) out of
the PG; the counts are reported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, get_args

import numpy as np
import torch

from selfspec.config import LossConfig, ScheduleConfig, ScheduleName
from selfspec.transitions import Transition

SCHEDULES = get_args(ScheduleName)  # the names the configs accept; make_schedule gives each its weights


@dataclass
class PositionBatch:
    """The drafted positions of several transitions, flattened to N rows; ids are draft-vocab indices."""
    hidden: torch.Tensor  # [N, d] in the head's dtype
    tau: torch.Tensor  # [N] temperature the stored log-probs are at (1 for greedy)
    draft_idx: torch.Tensor  # [N] long (0 where not in the draft vocab: see draft_in_vocab)
    draft_in_vocab: torch.Tensor  # [N] bool
    draft_logprobs: torch.Tensor  # [N] behaviour log-prob of the drafted token
    target_idx: torch.Tensor  # [N] long
    target_in_vocab: torch.Tensor  # [N] bool
    topk_idx: torch.Tensor  # [N, K] long: verifier top-K as draft indices
    topk_valid: torch.Tensor  # [N, K] bool: False where the id is outside the draft vocab (or padding)
    topk_logprobs: torch.Tensor  # [N, K] verifier log-probs (all K, in vocab or not)
    accepted: torch.Tensor  # [N] bool: reward 1
    on_path: torch.Tensor  # [N] bool: carries a reward (accepted or the first reject)
    head_version: torch.Tensor  # [N] long
    rounds: int  # number of transitions R
    # Attention heads only: each transition's committed context, left-padded to [R, W, d], its valid
    # length [R], and rows [N, 2] = (transition, offset among its drafted positions).
    context: torch.Tensor | None = None
    context_len: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.hidden.shape[0])


def _to_draft(ids: np.ndarray, vocab_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary ids -> (draft indices, in the draft vocabulary?); -1 (no draft, padding) is not."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if vocab_ids is None:
        hit = ids >= 0
        return torch.where(hit, ids, 0), hit
    vocab_ids = vocab_ids.cpu()
    idx = torch.searchsorted(vocab_ids, ids).clamp_max(len(vocab_ids) - 1)  # vocab_ids is sorted
    hit = (vocab_ids[idx] == ids) & (ids >= 0)
    return torch.where(hit, idx, 0), hit


def collate(transitions: Sequence[Transition], *, vocab_ids: torch.Tensor | None = None,
            dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
            with_context: bool = False) -> PositionBatch:
    """list[Transition] -> PositionBatch. `vocab_ids` is the head's sorted draft-index -> full-id map (None:
    full vocabulary). Top-K of different widths are padded with invalid entries of log-prob -inf.
    `with_context` also stacks the committed context for an attention head. Transitions were validated where
    they entered (built by selfspec.transitions, or decoded by buffer.codec), so they are not checked again."""
    if not transitions:
        raise ValueError("collate: no transitions")
    k = max(tr.target_topk_ids.shape[1] for tr in transitions)

    def cat(name):
        return np.concatenate([getattr(tr, name) for tr in transitions])

    def pad(tr, name, fill):
        arr = getattr(tr, name)
        return np.pad(arr, ((0, 0), (0, k - arr.shape[1])), constant_values=fill)

    topk_ids = np.concatenate([pad(tr, "target_topk_ids", -1) for tr in transitions])
    topk_lp = np.concatenate([pad(tr, "target_topk_logprobs", -np.inf) for tr in transitions])
    draft_idx, draft_in = _to_draft(cat("draft_tokens"), vocab_ids)
    target_idx, target_in = _to_draft(cat("target_tokens"), vocab_ids)
    topk_idx, topk_valid = _to_draft(topk_ids, vocab_ids)
    per_pos = lambda f: np.concatenate([np.full(tr.n, f(tr)) for tr in transitions])  # noqa: E731
    as_f = lambda a: torch.as_tensor(np.asarray(a, np.float64), dtype=dtype, device=device)  # noqa: E731
    on = lambda t: t.to(device)  # noqa: E731
    context = {}
    if with_context:
        width = max(tr.context_hidden.shape[0] for tr in transitions)
        d = transitions[0].hidden.shape[1]
        padded = np.zeros((len(transitions), width, d), np.float32)
        for r, tr in enumerate(transitions):
            if len(tr.context_hidden):
                padded[r, width - len(tr.context_hidden):] = tr.context_hidden
        rows = np.concatenate([np.stack([np.full(tr.n, r), np.arange(tr.n)], 1) for r, tr in enumerate(transitions)])
        context = {"context": as_f(padded), "rows": on(torch.as_tensor(rows, dtype=torch.long)),
                   "context_len": on(torch.as_tensor([len(tr.context_hidden) for tr in transitions]))}
    return PositionBatch(**context,
        hidden=as_f(cat("hidden")), tau=as_f(per_pos(lambda tr: tr.temperature if tr.temperature > 0 else 1.0)),
        draft_idx=on(draft_idx), draft_in_vocab=on(draft_in), draft_logprobs=as_f(cat("draft_logprobs")),
        target_idx=on(target_idx), target_in_vocab=on(target_in), topk_idx=on(topk_idx),
        topk_valid=on(topk_valid), topk_logprobs=as_f(topk_lp),
        accepted=on(torch.as_tensor(cat("accept_mask"))), on_path=on(torch.as_tensor(cat("on_path"))),
        head_version=on(torch.as_tensor(per_pos(lambda tr: tr.head_version), dtype=torch.long)),
        rounds=len(transitions))


def collate_for(head, transitions: Sequence[Transition]) -> PositionBatch:
    """collate with the head's draft vocabulary, dtype and device."""
    p = next(head.parameters())
    return collate(transitions, vocab_ids=head.vocab_ids, dtype=p.dtype, device=p.device, with_context=head.attends)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where() rather than indexing: an empty mask gives 0 with zero gradients (still in the graph), no NaN
    return torch.where(mask, values, 0).sum() / mask.sum().clamp_min(1)


def distill_kl(logits: torch.Tensor, batch: PositionBatch, temperature: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Forward KL(p_verifier || p_drafter), mean over all positions.

    Tail mass: both distributions are coarse-grained onto the same partition, {each verifier top-K
    id in the draft vocabulary} + one "rest" bucket; the verifier's rest mass is 1 - sum(in-vocab
    top-K) (its tail beyond K plus top-K ids the drafter cannot emit), compared against the drafter's
    exact mass on all its other ids (a logsumexp). This is a lower bound on the full KL (data
    processing), equal to it when the verifier's tail is empty, and asks the drafter to leave exactly
    the verifier's tail mass outside the top-K. Renormalising the top-K instead would teach it to be
    overconfident (push all mass into K ids the verifier itself only gives, say, 60% to). When every
    draft id is in the top-K there is no rest bucket and the verifier atoms are renormalised.

    `temperature` T softens both sides, Hinton style, loss scaled by T^2 so gradient size stays
    comparable. The rest bucket is then tempered as one atom (mass^(1/T)): exact only at T=1; for
    T>1 it under-weights the tail (sum x_i^(1/T) >= (sum x_i)^(1/T)).
    """
    logq = torch.log_softmax(logits / (batch.tau * temperature)[:, None], -1)
    in_topk = torch.zeros_like(logq, dtype=torch.int32).scatter_add_(1, batch.topk_idx, batch.topk_valid.int()) > 0
    has_rest = in_topk.sum(1) < logq.shape[1]
    q_rest = logq.masked_fill(in_topk, -math.inf).logsumexp(1)  # -inf without a rest bucket: weight 0 below
    logq_atoms = torch.cat([logq.gather(1, batch.topk_idx), q_rest[:, None]], 1)
    lp = batch.topk_logprobs.masked_fill(~batch.topk_valid, -math.inf)
    p_rest = (1 - lp.exp().sum(1)).clamp_min(0)  # float32-stored top-K can sum to 1 + 1e-7
    p_rest_log = torch.where(has_rest, p_rest.log(), -math.inf)
    logp_atoms = torch.log_softmax(torch.cat([lp, p_rest_log[:, None]], 1) / temperature, -1)
    p_atoms = logp_atoms.exp()
    terms = torch.where(p_atoms > 0, p_atoms * (torch.where(p_atoms > 0, logp_atoms, 0) - logq_atoms), 0)
    loss = terms.sum(1).mean() * temperature ** 2
    return loss, {"losses/kl": loss.item(), "charts/kl_tail_mass": float(p_rest.mean())}


def accepted_ce(logits: torch.Tensor, batch: PositionBatch) -> tuple[torch.Tensor, dict]:
    """-log p_drafter(verifier token), mean over accepted positions whose target is in the draft
    vocabulary; 0 (with zero gradients) when the batch has none."""
    logq = torch.log_softmax(logits / batch.tau[:, None], -1)
    mask = batch.accepted & batch.target_in_vocab
    loss = _masked_mean(-logq.gather(1, batch.target_idx[:, None])[:, 0], mask)
    return loss, {"losses/ce": loss.item(), "charts/ce_positions": float(mask.sum())}


def policy_gradient(logits: torch.Tensor, batch: PositionBatch, baseline: float, clip_eps: float = 0.2
                    ) -> tuple[torch.Tensor, dict]:
    """PPO-clipped REINFORCE on the drafted tokens of on-path positions.

    reward r = accepted (1/0), advantage A = r - baseline, ratio rho = pi_current(a) / pi_behaviour(a)
    (behaviour = `draft_logprobs`); loss = -mean(min(rho*A, clip(rho, 1-eps, 1+eps)*A)). On fresh
    data rho = 1 and the gradient is exactly REINFORCE's -A grad log pi; on stale data the min stops a
    position from pushing the policy further once it has moved eps in A's direction (zero gradient
    there), while moves against A stay unclipped and get corrected. Chosen over truncated IS because
    it also bounds several optimizer steps on the same batch. No per-batch advantage normalisation:
    batches can be a handful of positions.
    """
    logq = torch.log_softmax(logits / batch.tau[:, None], -1)
    mask = batch.on_path & batch.draft_in_vocab
    log_ratio = (logq.gather(1, batch.draft_idx[:, None])[:, 0] - batch.draft_logprobs).clamp(-20, 20)  # exp overflow
    ratio = log_ratio.exp()
    adv = batch.accepted.to(logq.dtype) - baseline
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    loss = -_masked_mean(surrogate, mask)
    with torch.no_grad():
        r = ratio.detach()
        metrics = {"losses/pg": loss.item(),
                   "charts/importance_ratio_mean": float(_masked_mean(r, mask)),
                   "charts/clip_fraction": float(_masked_mean(((r - 1).abs() > clip_eps).to(r.dtype), mask)),
                   "charts/approx_kl": float(_masked_mean((r - 1) - log_ratio.detach(), mask)),
                   "charts/advantage_mean": float(_masked_mean(adv, mask)),
                   "charts/pg_positions": float(mask.sum())}
    return loss, metrics


class EMABaseline:
    """Running mean of the per-batch mean reward (on-path acceptance), bias-corrected like Adam's
    moments so the first update gives exactly that batch's mean; `init` is used until then. Advantages
    use the value from before the batch's own update (the batch's rewards never enter its baseline)."""

    def __init__(self, decay: float = 0.9, init: float = 0.0):
        if not 0 <= decay < 1:
            raise ValueError(f"baseline decay must be in [0, 1), got {decay}")
        self.decay, self.init, self.mean, self.updates = decay, init, 0.0, 0

    @property
    def value(self) -> float:
        return self.init if self.updates == 0 else self.mean / (1 - self.decay ** self.updates)

    def update(self, mean_reward: float) -> None:
        self.mean = self.decay * self.mean + (1 - self.decay) * float(mean_reward)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "init": self.init, "mean": self.mean, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.init, self.mean, self.updates = (state[k] for k in ("decay", "init", "mean", "updates"))


@dataclass(frozen=True)
class LossWeights:
    kl: float
    ce: float
    pg: float
    phase: str  # warmup | ramp | rl
    progress: float  # ramp progress in [0, 1]


class Schedule:
    """Loss weights as a function of the optimizer step. `weights()` reads, `advance()` (once per
    optimizer step, by the caller) moves on. At step == warmup_steps the ramp starts at progress 0."""

    def __init__(self, config: ScheduleConfig | None = None, name: str = "kl_rl", step: int = 0):
        self.config, self.name, self.step = config or ScheduleConfig(), name, step

    def weights(self, step: int | None = None) -> LossWeights:
        c, s = self.config, self.step if step is None else step
        if s < c.warmup_steps:
            return LossWeights(c.kl_weight, 0.0, 0.0, "warmup", 0.0)
        f = 1.0 if c.ramp_steps == 0 else min(1.0, (s - c.warmup_steps) / c.ramp_steps)
        return LossWeights(c.kl_weight * (1 - f * (1 - c.kl_floor)), f * c.ce_weight, f * c.pg_weight,
                           "rl" if f >= 1 else "ramp", f)

    def advance(self, n: int = 1) -> None:
        self.step += n

    def state_dict(self) -> dict:
        return {"name": self.name, "step": self.step, "config": self.config.model_dump()}

    def load_state_dict(self, state: dict) -> None:
        self.name, self.step, self.config = state["name"], state["step"], ScheduleConfig(**state["config"])


def make_schedule(name: str, config: ScheduleConfig | dict | None = None) -> Schedule:
    """kl_rl uses the config as is; the ablations override keys of it so that all four are the same
    piecewise function: kl_only (CE = PG = 0, KL never decays), ce_only / pg_only (that loss alone at
    its target weight from step 0)."""
    config = config if isinstance(config, ScheduleConfig) else ScheduleConfig(**(config or {}))
    overrides = {"kl_rl": {},
                 "kl_only": {"ce_weight": 0.0, "pg_weight": 0.0, "kl_floor": 1.0},
                 "ce_only": {"kl_weight": 0.0, "pg_weight": 0.0, "warmup_steps": 0, "ramp_steps": 0},
                 "pg_only": {"kl_weight": 0.0, "ce_weight": 0.0, "warmup_steps": 0, "ramp_steps": 0}}
    if name not in overrides:
        raise ValueError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    return Schedule(ScheduleConfig(**{**config.model_dump(), **overrides[name]}), name)


def total_loss(head, batch: PositionBatch, state: TrainState, config: LossConfig | None = None, *,
               update_baseline: bool = True) -> tuple[torch.Tensor, dict]:
    """Weighted KL + CE + PG at the schedule's current step (one head forward), and cleanRL-style
    metrics. Updates the baseline with this batch's on-path acceptance after using it (pass
    update_baseline=False to evaluate); does not advance the schedule."""
    config, schedule, baseline = config or LossConfig(), state.schedule, state.baseline
    w = schedule.weights()
    logits = head.batch_logits(batch.hidden, batch.context, batch.context_len, batch.rows)
    kl, m_kl = distill_kl(logits, batch, config.distill_temperature)
    ce, m_ce = accepted_ce(logits, batch)
    b = baseline.value
    pg, m_pg = policy_gradient(logits, batch, b, config.clip_eps)
    loss = w.kl * kl + w.ce * ce + w.pg * pg
    reward_mask = batch.on_path & batch.draft_in_vocab
    accept_rate = float(batch.accepted[reward_mask].double().mean()) if bool(reward_mask.any()) else 0.0
    if update_baseline and bool(reward_mask.any()):
        baseline.update(accept_rate)
    with torch.no_grad():
        agree = (logits.argmax(-1) == batch.target_idx) & batch.target_in_vocab
    return loss, {"losses/total": loss.item(), **m_kl, **m_ce, **m_pg,
                  "charts/kl_weight": w.kl, "charts/ce_weight": w.ce, "charts/pg_weight": w.pg,
                  "charts/ramp_progress": w.progress, "charts/schedule_step": float(schedule.step),
                  "charts/baseline": b, "charts/accept_rate": accept_rate,
                  "charts/accepted_per_round": float(batch.accepted.sum()) / batch.rounds,
                  "charts/agreement": float(agree.double().mean()),
                  "charts/target_oov_fraction": float((~batch.target_in_vocab).double().mean()),
                  "charts/positions": float(len(batch))}


@dataclass
class TrainState:
    """What a training loop carries from step to step besides the head and its optimizer."""
    schedule: Schedule
    baseline: EMABaseline

    @classmethod
    def create(cls, schedule: str, schedule_config: ScheduleConfig | dict | None, loss: LossConfig) -> "TrainState":
        return cls(make_schedule(schedule, schedule_config), EMABaseline(loss.baseline_decay, loss.baseline_init))

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict(), "baseline": self.baseline.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.baseline.load_state_dict(state["baseline"])


def train_step(head, optimizer, transitions: Sequence[Transition], state: TrainState,
               config: LossConfig) -> dict:
    """One optimizer step of the head on these transitions at the schedule's current weights; advances
    the schedule and returns the step's metrics. `optimizer` is a torch optimizer over the head's
    trainable parameters, or a DeepSpeed engine wrapping the head (it owns backward, so that gradients
    are averaged across ranks). The one training step of every loop: in-process and distributed."""
    loss, metrics = total_loss(head, collate_for(head, transitions), state, config)
    if hasattr(optimizer, "backward"):  # a DeepSpeed engine
        optimizer.backward(loss)
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    state.schedule.advance()
    return metrics
