"""Lossless self-speculative decoding of one request (batch 1).

Each round: the pending token (emitted last round, not yet run) goes through the trunk; the head
drafts from its layer-k hidden state, each draft also going through the trunk (for the next draft
and for verification); then layers [k, L) verify the pending token and all drafts in one pass,
reusing the trunk hidden states and KV computed while drafting. The longest agreeing prefix is kept
plus one verifier token, and the cache is rolled back to what was kept. γ=0 is plain decoding.

With `ngram` on, a round whose committed tokens end in an n-gram seen earlier copies what followed
it as drafts instead (prompt lookup; see selfspec.ngram), when the length policy expects that to pay.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from selfspec.acceptance import greedy_accept, sampling_accept
from selfspec.drafter import DrafterHead
from selfspec.length_policy import LengthPolicy
from selfspec.model import eos_ids as model_eos_ids
from selfspec.ngram import MAX_NGRAM, NgramIndex, Proposal
from selfspec.split import SplitModel
from selfspec.transitions import Transition


@dataclass
class RoundStats:
    drafted: int
    accepted: int
    t_draft: float
    t_verify: float


@dataclass
class DecodeResult:
    tokens: list[int]
    rounds: list[RoundStats] = field(default_factory=list)
    stop_reason: str = "length"
    t_prefill: float = 0.0
    t_total: float = 0.0

    @property
    def mean_accepted_length(self) -> float:
        return float(np.mean([r.accepted + 1 for r in self.rounds])) if self.rounds else 1.0


@dataclass
class _Request:
    """Decoding state between rounds: caches cover positions [0, position); `pending` sits at `position`."""
    cache: object
    pending: int
    position: int
    budget: int  # new tokens still allowed, the pending one already counted
    out: list[int]
    generator: torch.Generator | None
    request_id: str
    rounds: int = 0
    history: list[torch.Tensor] = field(default_factory=list)  # committed trunk hiddens (context heads only)
    head_cache: object = None  # attention heads: their own KV cache over the trunk hiddens
    ngram: NgramIndex | None = None  # committed tokens, for copied drafts


class SelfSpecDecoder:
    def __init__(self, split: SplitModel, head: DrafterHead | None = None, policy: LengthPolicy | None = None,
                 sink: Callable[[Transition], None] | None = None, topk: int = 16, run_id: str = "local",
                 actor_id: int = 0, policy_version: int = 0, workload: str = "", ngram: int = 0):
        self.split, self.head, self.sink, self.topk = split, head, sink, topk
        self.policy = policy or LengthPolicy(0)
        if not 0 <= ngram <= MAX_NGRAM:
            raise ValueError(f"ngram (shortest suffix match to copy drafts from, 0 = off) must be in [0, {MAX_NGRAM}], "
                             f"got {ngram}")
        self.ngram = ngram
        if self.policy.max_drafts > 0 and head is None and not ngram:
            raise ValueError("drafting (gamma > 0) needs a drafter head or n-gram drafts")
        self.run_id, self.actor_id, self.policy_version, self.workload = run_id, actor_id, policy_version, workload
        self.window = head.config.context_window if head is not None else 0

    @torch.inference_mode()
    def generate(self, prompt_ids, max_new_tokens: int = 128, temperature: float = 0.0, seed: int | None = None,
                 eos_ids: set[int] | None = None, request_id: str | None = None) -> DecodeResult:
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=self.split.device).flatten()
        limit = self.split.max_positions
        if prompt.numel() == 0:
            raise ValueError("empty prompt: give at least one token")
        if prompt.numel() >= limit:
            raise ValueError(f"prompt has {prompt.numel()} tokens but the model has {limit} positions; "
                             f"shorten it to at most {limit - 1}")
        if temperature < 0 or not np.isfinite(temperature):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = eos_ids if eos_ids is not None else model_eos_ids(self.split.config)
        budget = min(max_new_tokens, limit - prompt.numel())
        start = time.perf_counter()
        cache = self.split.new_cache(prompt.numel() + budget + self.policy.max_drafts + 1)
        generator = torch.Generator(self.split.device).manual_seed(seed) if temperature > 0 and seed is not None else None
        hidden = self.split.trunk(prompt, 0, cache)
        logits = self.split.verify(hidden, 0, cache)[-1:]
        no_drafts = torch.empty(0, dtype=torch.long)
        _, first = (greedy_accept(no_drafts, logits) if temperature == 0
                    else sampling_accept(no_drafts, None, _probs(logits, temperature), generator))
        req = _Request(cache, first, prompt.numel(), budget - 1, [first], generator, request_id or uuid.uuid4().hex[:12])
        if self.window:
            req.history = list(hidden[0, -self.window:])
        if self.head is not None:
            req.head_cache = self.head.new_cache(cache.capacity)
        if self.ngram:
            req.ngram = NgramIndex([*prompt.tolist(), first])
        result = DecodeResult(req.out, t_prefill=time.perf_counter() - start)
        result.stop_reason = "eos" if first in eos else "length"
        while req.budget > 0 and result.stop_reason != "eos":
            stats, emitted = self._round(req, temperature)
            result.rounds.append(stats)
            for tok in emitted:
                req.out.append(tok)
                if tok in eos:
                    result.stop_reason = "eos"
                    break
        result.t_total = time.perf_counter() - start
        return result

    def _round(self, req: _Request, temperature: float) -> tuple[RoundStats, list[int]]:
        t, split = req.position, self.split
        wall_start, t0 = time.time(), time.perf_counter()
        room = min(self.policy.max_drafts, req.budget - 1)  # the bonus token needs one slot of the budget
        proposal = req.ngram.propose(room, self.ngram) if req.ngram is not None and room > 0 else Proposal([], 0)
        copied = proposal.tokens[:self.policy.ngram_drafts(proposal.ngram, len(proposal.tokens))] if proposal.tokens else []
        # Copied drafts need no head, so pending + drafts go through the trunk in one pass.
        hiddens = [split.trunk(torch.tensor([req.pending, *copied], device=split.device), t, req.cache)]
        t1 = time.perf_counter()
        drafts, draft_logits, confidences, shadow = list(copied), [], [], None
        if not copied and room > 0 and self.head is not None and self.policy.start_round():
            shadow = self._head_drafts(req, hiddens, drafts, draft_logits, confidences, room, temperature)
        t2 = time.perf_counter()
        hidden = torch.cat(hiddens, 1)
        target_logits = split.verify(hidden, t, req.cache)  # [n+1, V]: one pass over layers [k, L)
        draft_ids = torch.tensor(drafts, dtype=torch.long)
        if temperature == 0:
            n_acc, nxt = greedy_accept(draft_ids, target_logits)
        else:
            q = _one_hot(draft_ids, target_logits.shape[-1]) if copied else self._draft_probs(draft_logits, temperature)
            n_acc, nxt = sampling_accept(draft_ids, q, _probs(target_logits, temperature), req.generator)
        req.cache.crop(t + n_acc + 1)  # keep pending + accepted drafts; the bonus token becomes pending
        if req.head_cache is not None:
            req.head_cache.crop(t + n_acc + 1)
        emitted = drafts[:n_acc] + [int(nxt)]  # fits the budget: room left a slot for the bonus token
        req.position, req.pending, req.budget = t + n_acc + 1, emitted[-1], req.budget - len(emitted)
        req.rounds += 1
        if proposal.tokens:  # judged also when not verified: against the tokens this round emitted anyway
            self.policy.update_ngram(proposal.ngram, proposal.tokens, emitted)
        if confidences:
            self.policy.update(confidences, n_acc)
        elif shadow is not None:
            self.policy.update([shadow[0]], int(shadow[1] == nxt))
        if self.sink is not None and draft_logits:
            self.sink(self._transition(req, hidden[0], draft_ids, draft_logits, target_logits, n_acc, nxt,
                                       temperature, wall_start))
        if self.window:
            req.history.extend(hidden[0, : n_acc + 1])
            del req.history[:-self.window]
        if req.ngram is not None:
            req.ngram.extend(emitted)
        t3 = time.perf_counter()
        return RoundStats(len(drafts), n_acc, t2 - t1, (t1 - t0) + (t3 - t2)), emitted

    def _head_drafts(self, req, hiddens, drafts, draft_logits, confidences, room, temperature):
        """Draft with the head while the length policy keeps going, each draft through the trunk; appends
        to the lists given. Returns a shadow draft (confidence, token) when the policy drafted none."""
        head, t = self.head, req.position
        new, start = self._unseen_by_head(req, hiddens[0])
        while len(drafts) < room:
            logits = head.next_logits(new, start, req.head_cache).float()
            logp = torch.log_softmax(logits / temperature if temperature else logits, -1)
            top = float(logp.max().exp())
            if not self.policy.keep(len(drafts), top, float(-(logp.exp() * logp).sum())):
                # a shadow draft: judged for free by this round's token
                return (top, int(head.to_full_ids(logp.argmax()))) if not drafts and temperature == 0 else None
            idx = torch.multinomial(logp.exp(), 1, generator=req.generator)[0] if temperature else logp.argmax()
            drafts.append(int(head.to_full_ids(idx)))
            draft_logits.append(logits)
            confidences.append(top)
            hiddens.append(self.split.trunk(torch.tensor([drafts[-1]], device=self.split.device), t + len(drafts),
                                            req.cache))
            new, start = hiddens[-1], t + len(drafts)
        return None

    def _unseen_by_head(self, req: _Request, pending_hidden: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The layer-k hiddens an attention head has yet to see (committed positions within its window
        it skipped in rounds without drafts, then the pending token) and the first one's position."""
        if req.head_cache is None:
            return pending_hidden, req.position
        first = max(req.head_cache.length(0), req.position - len(req.history))
        missed = req.history[len(req.history) - (req.position - first):]
        return torch.cat([torch.stack(missed)[None], pending_hidden], 1) if missed else pending_hidden, first

    def _draft_probs(self, draft_logits: list[torch.Tensor], temperature: float) -> torch.Tensor | None:
        """Draft distributions over the full vocabulary [n, V] (zero outside a reduced draft vocab)."""
        if not draft_logits:
            return None
        q = torch.softmax(torch.stack(draft_logits) / temperature, -1)
        if self.head.vocab_ids is None:
            return q
        full = torch.zeros(q.shape[0], self.split.config.vocab_size, dtype=q.dtype)
        return full.index_copy_(1, self.head.vocab_ids, q)

    def _transition(self, req, hidden, draft_ids, draft_logits, target_logits, n_acc, nxt, temperature, wall_start):
        tau = temperature if temperature else 1.0  # greedy: store the head's own (T=1) distribution
        draft_logp = torch.log_softmax(torch.stack(draft_logits) / tau, -1)
        n, k = len(draft_ids), min(self.topk, draft_logp.shape[-1])  # a small draft vocab bounds K for both sides
        target_logp = torch.log_softmax(target_logits[:n].float() / tau, -1)
        target_top = target_logp.topk(k, -1)
        target_tokens = target_logits[:n].argmax(-1)
        target_tokens[:n_acc] = draft_ids[:n_acc]
        if n_acc < n:
            target_tokens[n_acc] = nxt
        positions = torch.arange(n)
        context = (torch.stack(req.history[-self.window:]).half().cpu().numpy() if self.window
                   else np.zeros((0, 0), np.float16))
        return Transition(
            run_id=self.run_id, actor_id=self.actor_id, request_id=req.request_id, round=req.rounds,
            policy_version=self.policy_version, workload=self.workload, t_start=wall_start,
            t_end=time.time(), temperature=float(temperature),
            hidden=hidden[:n].half().cpu().numpy(),
            **self.head.draft_fields(draft_logp, draft_ids, k),
            target_topk_ids=target_top.indices.int().cpu().numpy(),
            target_topk_logprobs=target_top.values.float().cpu().numpy(),
            target_tokens=target_tokens.int().cpu().numpy(),
            accept_mask=(positions < n_acc).numpy(), on_path=(positions <= n_acc).numpy(),
            context_hidden=context)


def _one_hot(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """The draft distribution of a copied (deterministic) draft."""
    return torch.nn.functional.one_hot(ids, vocab).double()


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, -1)

