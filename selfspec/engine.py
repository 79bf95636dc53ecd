"""Lossless self-speculative decoding of a batch of requests; one request alone is a batch of one.

A round, for every sequence of the batch at once: draft (a sequence copies what followed an earlier
occurrence of its text's suffix, in its own text or in the traffic memory of what was served before, or
the head drafts from its layer-k hidden state, each draft also going through the trunk; or it drafts
nothing) -> verify (layers [k, L) on every sequence's pending token and drafts: one pass over the ragged
block, padded and masked by position, reusing the trunk's hidden states and KV) -> accept (per sequence: the longest agreeing prefix plus one verifier token) -> observe (the
length policy learns what paid) -> emit (each sequence's Transition for the learner, built by
selfspec.transitions) -> commit (each sequence moves to what it kept; the verifier's token is pending).
Requests join between rounds (`join`, `join_all`: the prompts' prefill, one pass for prompts of similar
length, whose next token is each one's first pending one) and leave when done (`step` retires them) or
when the caller ends them (`leave`): continuous batching, which selfspec.batching runs for a queue of
requests. γ=0 is plain batched decoding.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from selfspec.acceptance import greedy_accept, sampling_accept
from selfspec.passes import PassRunner, pass_runner
from selfspec.prefill_groups import prefill_groups
from selfspec.copy_sources import CopySources
from selfspec.drafter import DrafterHead
from selfspec.kv_cache import Block, carry
from selfspec.length_policy import LengthPolicy, RoundOutcome, Shadow
from selfspec.model import eos_ids as model_eos_ids
from selfspec.ngram import NgramIndex
from selfspec.proposal import MEMORY, TEXT, Proposal
from selfspec.request import DecodeOptions, DecodeResult, RoundStats
from selfspec.span_clock import SpanClock
from selfspec.split import SplitModel
from selfspec.transitions import (Prefill, RoundMeta, Transition, VerifiedRound, prompt_transition,
                                  round_transition)


COPY_KIND = {TEXT: "copied", MEMORY: "remembered"}  # a copy proposal's source -> its Draft kind


@dataclass
class TransitionSink:
    """Where a decoder sends each round's Transition (`write`), and what the record holds."""
    write: Callable[[Transition], None]
    run_id: str = "local"
    actor_id: int = 0
    topk: int = 16
    prompt_rows: int = 0  # also the prompt's last N positions (kind distill): prefill verified them too


@dataclass
class Draft:
    """One sequence's drafts in a round and what verifying them needs."""
    kind: str  # "copied" (own text), "remembered" (traffic memory), "drafted" (head) or "none" (no drafts)
    hiddens: list[torch.Tensor]  # layer-k hidden [1, m, d]: the pending token, then each draft
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # head drafts, over the draft vocab
    confidences: list[float] = field(default_factory=list)  # head drafts: top probability
    shadow: Shadow | None = None  # the head's greedy choice when the policy drafted nothing

    @property
    def hidden(self) -> torch.Tensor:
        return torch.cat(self.hiddens, 1)


@dataclass
class Sequence:
    """A request in the decoder's batch, between rounds: its slot's cache covers [0, position); `pending`
    sits at `position`. `result` grows as rounds settle tokens; `finished` once it left the batch."""
    options: DecodeOptions
    result: DecodeResult
    eos: set[int]
    pending: int
    position: int
    budget: int  # new tokens still allowed, the pending one already counted
    generator: torch.Generator | None
    started: float  # perf_counter() when it joined
    slot: int = 0
    rounds: int = 0
    finished: bool = False
    history: list[torch.Tensor] = field(default_factory=list)  # committed trunk hiddens
    head_cache: object = None  # attention heads: their own KV cache over the trunk hiddens
    ngram: NgramIndex | None = None  # committed tokens, for copied drafts


@dataclass
class _Joining:
    """A checked request about to prefill."""
    prompt: torch.Tensor
    budget: int
    options: DecodeOptions
    eos: set[int]


class SelfSpecDecoder:
    def __init__(self, split: SplitModel, head: DrafterHead | None = None,
                 length_policy: LengthPolicy | None = None, copies: CopySources | None = None,
                 sink: TransitionSink | None = None, passes: PassRunner | None = None):
        """`copies`: where sequences copy drafts from (their own text, a traffic memory; None: nowhere).
        `passes`: what runs the passes (selfspec.passes; None: `pass_runner(split)`, CUDA graphs on a GPU, the
        split itself elsewhere); give the one a cost-aware policy was measured on."""
        self.split, self.sink = split, sink
        self.passes = passes if passes is not None else pass_runner(split)
        self.length_policy = length_policy or LengthPolicy(0)
        self.copies = copies or CopySources()
        if self.length_policy.max_drafts > 0 and head is None and not self.copies.on:
            raise ValueError("drafting (gamma > 0) needs a drafter head, n-gram drafts or a traffic memory")
        self.batch: list[Sequence] = []  # in slot order: batch[i].slot == i
        self.cache = None
        self.set_head(head)

    def set_head(self, head: DrafterHead | None, version: int = 0) -> None:
        """Swap the drafter head (between rounds): output never changes, only speed. `version` goes into
        the transitions it drafts. An attention head's own cache starts over, from the committed window."""
        self.head, self.head_version = head, version
        self.window = head.config.context_window if head is not None else 0
        for seq in self.batch:
            seq.head_cache = head.new_cache(self.cache.capacity) if head is not None else None

    def generate(self, prompt_ids, options: DecodeOptions | None = None, **overrides) -> DecodeResult:
        """Decode one request alone (a batch of one); `overrides` set DecodeOptions fields (max_new_tokens=...).
        Many at once: selfspec.batching."""
        if self.batch:
            raise RuntimeError("this decoder is decoding a batch: serve requests through selfspec.batching")
        seq = self.join(prompt_ids, options, **overrides)
        try:
            while not seq.finished:
                self.step()
        finally:  # a failed round leaves the decoder empty for the next request
            self.leave(seq)
        return seq.result

    @torch.inference_mode()
    def join(self, prompt_ids, options: DecodeOptions | None = None, **overrides) -> Sequence:
        """Add a request to the batch: its prompt's prefill, whose next token (in result.tokens) is the
        verifier's own. A request that ends there (EOS, one token) has left already (`finished`)."""
        return self.join_all([(prompt_ids, replace(options or DecodeOptions(), **overrides))])[0]

    @torch.inference_mode()
    def join_all(self, requests: list[tuple[object, DecodeOptions]]) -> list[Sequence]:
        """Add several requests, (prompt ids, options) each, as `join` does: prompts of similar length
        prefill together in one pass (`prefill_groups`). Every request is checked before any runs."""
        joining = [self._joining(prompt_ids, opts) for prompt_ids, opts in requests]
        seqs: list[Sequence | None] = [None] * len(joining)
        before = len(self.batch)
        try:
            for group in prefill_groups([j.prompt.numel() for j in joining]):
                for i, seq in zip(group, self._prefill([joining[i] for i in group])):
                    seqs[i] = seq
        except BaseException:  # none of them joins (they are the last slots): the batch goes on as it was
            while len(self.batch) > before:
                self.leave(self.batch[-1])
            raise
        for seq in seqs:
            if seq.pending in seq.eos:
                seq.result.stop_reason = "eos"
            if seq.pending in seq.eos or seq.budget == 0:
                self._retire(seq)
        return seqs

    def check(self, prompt_ids, options: DecodeOptions) -> None:
        """Raise a clear ValueError for a request that cannot run (what `join` would refuse)."""
        self._budget(torch.as_tensor(prompt_ids, dtype=torch.long).flatten(), options)

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, list[int]]]:
        """One round for every sequence of the batch: each one with the tokens it adds. Sequences that end
        (EOS, their budget) leave the batch."""
        batch = list(self.batch)
        out = []
        if not batch:
            return out
        for seq, emitted in zip(batch, self._round(batch)):
            new = []
            for tok in emitted:
                new.append(tok)
                if tok in seq.eos:
                    seq.result.stop_reason = "eos"
                    break
            seq.result.tokens += new
            if seq.result.stop_reason == "eos" or seq.budget <= 0:
                self._retire(seq)
            out.append((seq, new))
        return out

    @torch.inference_mode()
    def leave(self, seq: Sequence, stop_reason: str | None = None) -> None:
        """End a request between rounds (`stop_reason` "stop": a stop sequence matched; None: abandoned)."""
        if seq.finished:
            return
        if stop_reason is not None:
            seq.result.stop_reason = stop_reason
        self._retire(seq)

    def _retire(self, seq: Sequence) -> None:
        """Out of the batch: the last sequence moves into its slot, so that the batch's slots stay the first ones."""
        last = self.batch[-1]
        if last is not seq:
            self.cache.move(last.slot, seq.slot, last.position)
            last.slot = seq.slot
            self.batch[seq.slot] = last
        self.batch.pop()
        seq.finished = True
        seq.result.t_total = time.perf_counter() - seq.started

    def _joining(self, prompt_ids, opts: DecodeOptions) -> "_Joining":
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=self.split.device).flatten()
        eos = opts.eos_ids if opts.eos_ids is not None else model_eos_ids(self.split.config)
        opts = replace(opts, request_id=opts.request_id or uuid.uuid4().hex[:12])
        return _Joining(prompt, self._budget(prompt, opts), opts, eos)

    def _budget(self, prompt: torch.Tensor, opts: DecodeOptions) -> int:
        """The new-token budget, or a clear error for a request that cannot run."""
        limit, prompt_len = self.split.max_positions, prompt.numel()
        if prompt_len == 0:
            raise ValueError("empty prompt: give at least one token")
        if prompt.min() < 0 or prompt.max() >= self.split.config.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.split.config.vocab_size})")
        if prompt_len >= limit:
            raise ValueError(f"prompt has {prompt_len} tokens but the model has {limit} positions; "
                             f"shorten it to at most {limit - 1}")
        if opts.temperature < 0 or not np.isfinite(opts.temperature):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {opts.temperature}")
        if opts.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {opts.max_new_tokens}")
        return min(opts.max_new_tokens, limit - prompt_len)

    def _make_room(self, slots: int, capacity: int) -> None:
        """A cache with at least `slots` slots of `capacity` positions, keeping what the batch holds."""
        old = self.cache
        if old is not None and old.slots >= slots and old.capacity >= capacity:
            return
        if old is not None:
            slots, capacity = max(slots, old.slots), max(capacity, old.capacity)
        self.cache = self.passes.new_cache(capacity, slots)
        if old is not None and self.cache is not old:
            carry(old, self.cache)
            for seq in self.batch:  # attention heads' own caches have the decoder cache's capacity
                if seq.head_cache is not None:
                    seq.head_cache = self.head.new_cache(self.cache.capacity)

    def _prefill(self, group: list["_Joining"]) -> list[Sequence]:
        """Run prompts through the whole model in one pass, in the next free slots (padded to the longest,
        masked by position); each one's next token, the verifier's own (nothing was drafted), becomes its
        first pending one."""
        started, first_slot = time.perf_counter(), len(self.batch)
        lengths = [j.prompt.numel() for j in group]
        # room for the longest block a round may pass (γ + 1 wide) and a padding row's position after it
        self._make_room(first_slot + len(group),
                        max(n + j.budget for n, j in zip(lengths, group)) + self.length_policy.max_drafts + 2)
        block = Block((0,) * len(group), tuple(lengths), first_slot)
        ids = torch.stack([torch.nn.functional.pad(j.prompt, (0, max(lengths) - n)) for n, j in zip(lengths, group)])
        rows = self.sink.prompt_rows if self.sink is not None else 0
        hidden = self.passes.trunk(ids, block, self.cache)
        logits = self.passes.verify(hidden, block, self.cache, last=max(rows, 1))  # [B, last, V]
        seqs = []
        for b, (n, j) in enumerate(zip(lengths, group)):
            opts = j.options
            generator = None
            if opts.temperature > 0 and opts.seed is not None:
                generator = torch.Generator(self.split.device).manual_seed(opts.seed)
            first = _next_token(logits[b, -1:], opts.temperature, generator)
            seq = Sequence(opts, DecodeResult([first]), j.eos, first, n, j.budget - 1, generator, started,
                           first_slot + b)
            if rows:
                prefill = Prefill(j.prompt, hidden[b:b + 1, :n], logits[b, -min(rows, n):], first)
                self.sink.write(prompt_transition(self._meta(seq, 0, time.time()), prefill, rows, self._topk()))
            if self.window:
                seq.history = list(hidden[b, max(n - self.window, 0):n])
            if self.head is not None:
                seq.head_cache = self.head.new_cache(self.cache.capacity)
            seq.ngram = self.copies.text_index([*j.prompt.tolist(), first])
            seq.result.t_prefill = time.perf_counter() - started
            self.batch.append(seq)
            seqs.append(seq)
        return seqs

    def _round(self, batch: list[Sequence]) -> list[list[int]]:
        """draft -> verify -> accept -> observe -> emit -> commit, for every sequence at once; the tokens
        each one emits."""
        policy, clock, t_start = self.length_policy, SpanClock(), time.time()
        policy.begin_round(len(batch))
        rooms = [min(policy.max_drafts, seq.budget - 1) for seq in batch]  # keep a slot for the bonus token
        with clock("draft"):
            proposals, copies, sources = self._copies(batch, rooms)
        with clock("verify"):  # copied drafts need no head: they go through the trunk with the pending token
            first = self._trunk(batch, [[seq.pending, *c] for seq, c in zip(batch, copies)])
        with clock("draft"):
            drafts = [Draft(COPY_KIND[s] if c else "none", [first[i:i + 1, :1 + len(c)]], c)
                      for i, (c, s) in enumerate(zip(copies, sources))]
            head_rows = [i for i, (c, room) in enumerate(zip(copies, rooms)) if not c and room > 0]
            head_called = bool(head_rows) and self.head is not None and policy.start_round()
            if head_called:
                self._head_drafts(batch, drafts, head_rows, rooms)
        with clock("verify"):  # one pass over layers [k, L) verifies every sequence's drafts
            hiddens = [d.hidden for d in drafts]  # [1, 1 + drafts, d] each
            width = max(h.shape[1] for h in hiddens)
            block = Block(tuple(seq.position for seq in batch), tuple(h.shape[1] for h in hiddens))
            padded = [torch.nn.functional.pad(h, (0, 0, 0, width - h.shape[1])) for h in hiddens]  # zeros after
            logits = self.passes.verify(torch.cat(padded), block, self.cache)
            logits = [logits[i, :h.shape[1]] for i, h in enumerate(hiddens)]
            accepted = [self._accept(d, lg, seq.options.temperature, seq.generator)
                        for seq, d, lg in zip(batch, drafts, logits)]
        if not head_called:  # what copy rounds of this width cost now: the policy judges goodput on it
            policy.observe_round(width - 1, clock["draft"] + clock["verify"])
        emitted_all = []
        for seq, offered, draft, hidden, lg, (n_acc, bonus) in zip(batch, proposals, drafts, hiddens, logits, accepted):
            seq.rounds += 1
            emitted = draft.tokens[:n_acc] + [bonus]  # fits the budget: room kept a slot for the bonus token
            policy.observe(RoundOutcome(offered, draft.confidences, draft.shadow, n_acc, emitted))
            if self.sink is not None:  # before commit: the record's context is the window before this round
                context = seq.history[-self.window:] if self.window else []
                verified = VerifiedRound(draft, hidden, context, lg, emitted)
                self.sink.write(round_transition(self._meta(seq, seq.rounds, t_start), verified, self._topk(), self.head))
            self._commit(seq, hidden, n_acc, emitted)
            seq.result.rounds.append(RoundStats(len(draft.tokens), n_acc, clock["draft"], clock["verify"], len(batch),
                                                draft.kind))
            emitted_all.append(emitted)
        policy.observe_goodput(head_called or any(copies), sum(map(len, emitted_all)), clock["draft"] + clock["verify"])
        return emitted_all

    def _copies(self, batch: list[Sequence], rooms: list[int]) -> tuple[list[list[Proposal]], list[list[int]], list[str]]:
        """Each sequence's copy proposals (its own text's, the memory's), and of the one the length policy
        offers, as much as it expects to pay, and that one's source."""
        proposals = [self.copies.propose(seq.ngram, room) for seq, room in zip(batch, rooms)]
        offers = [self.length_policy.choose_copy(p) for p in proposals]
        offered = [i for i, p in enumerate(offers) if p.tokens]
        copies: list[list[int]] = [[] for _ in batch]
        for i, n in zip(offered, self.length_policy.copy_drafts([offers[i] for i in offered]) if offered else []):
            copies[i] = offers[i].tokens[:n]
        return proposals, copies, [p.source for p in offers]

    def _trunk(self, batch: list[Sequence], rows: list[list[int]], starts: list[int] | None = None) -> torch.Tensor:
        """Token rows (ragged; an empty row is padding) through the trunk from each sequence's position (or
        `starts`), one pass: hidden [B, width, d]."""
        width = max(map(len, rows))
        starts = starts or [seq.position for seq in batch]
        ids = self._ids([row + [row[-1] if row else 0] * (width - len(row)) for row in rows])
        return self.passes.trunk(ids, Block(tuple(starts), tuple(map(len, rows))), self.cache)

    def _head_drafts(self, batch: list[Sequence], drafts: list[Draft], rows: list[int], rooms: list[int]) -> None:
        """The head drafts for `rows`, step by step while the length policy keeps going for each, a step's
        drafts through the trunk in one pass. A sequence whose first draft is not kept gets a shadow: the
        head's greedy choice, judged for free by this round's token."""
        policy, head = self.length_policy, self.head
        kept: dict[int, list[float]] = {i: [] for i in rows}
        unseen = {i: self._unseen_by_head(batch[i], drafts[i].hiddens[0]) for i in rows}  # (hidden, start)
        while rows:
            stepped = []
            for i, logits in zip(rows, self._head_logits(batch, rows, unseen)):
                seq, draft = batch[i], drafts[i]
                temperature, logits = seq.options.temperature, logits.float()
                logp = torch.log_softmax(logits / temperature if temperature else logits, -1)
                top = float(logp.max().exp())
                if not policy.keep(kept[i], top, float(-(logp.exp() * logp).sum())):
                    if not draft.tokens and temperature == 0:
                        draft.shadow = Shadow(top, int(head.to_full_ids(logp.argmax())))
                    continue
                idx = torch.multinomial(logp.exp(), 1, generator=seq.generator)[0] if temperature else logp.argmax()
                draft.kind = "drafted"
                draft.tokens.append(int(head.to_full_ids(idx)))
                draft.logits.append(logits)
                draft.confidences.append(top)
                stepped.append(i)
            if not stepped:
                return
            # the step's drafts through the trunk; the other sequences are padding, past this round's block
            after = [seq.position + policy.max_drafts + 1 for seq in batch]
            for i in stepped:
                after[i] = batch[i].position + len(drafts[i].tokens)
            hidden = self._trunk(batch, [drafts[i].tokens[-1:] if i in stepped else [] for i in range(len(batch))],
                                 after)
            for i in stepped:
                drafts[i].hiddens.append(hidden[i:i + 1])
                unseen[i] = (hidden[i:i + 1], after[i])
            rows = [i for i in stepped if len(drafts[i].tokens) < rooms[i]]

    def _head_logits(self, batch: list[Sequence], rows: list[int], unseen: dict) -> list[torch.Tensor]:
        """The head's next-token logits for each of `rows`: one call for the batch (an MLP head reads each
        row's newest hidden state), or a call per sequence (an attention head reads its own cache)."""
        if not self.head.attends:
            hidden = torch.cat([unseen[i][0][:, -1:] for i in rows])
            return list(self.passes.head_logits(self.head, hidden, 0, None))
        return [self.passes.head_logits(self.head, unseen[i][0], unseen[i][1], batch[i].head_cache)[0] for i in rows]

    def _commit(self, seq: Sequence, hidden: torch.Tensor, n_acc: int, emitted: list[int]) -> None:
        """Keep the pending token and the accepted drafts; the bonus token becomes pending. Rejected
        drafts need no rollback in the decoder's cache (masked by position); the head's own cache crops."""
        kept = seq.position + n_acc + 1
        if seq.head_cache is not None:
            seq.head_cache.crop(kept)
        if self.window:
            seq.history.extend(hidden[0, : n_acc + 1])
            del seq.history[:-self.window]
        if seq.ngram is not None:
            seq.ngram.extend(emitted)
        seq.position, seq.pending, seq.budget = kept, emitted[-1], seq.budget - len(emitted)

    def _unseen_by_head(self, seq: Sequence, pending: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The layer-k hiddens an attention head has yet to see (committed positions within its
        window it skipped in rounds without drafts, then the pending token) and the first one's
        position."""
        if seq.head_cache is None:
            return pending, seq.position
        first = max(seq.head_cache.length(0), seq.position - len(seq.history))
        missed = seq.history[len(seq.history) - (seq.position - first):]
        return (torch.cat([torch.stack(missed)[None], pending], 1) if missed else pending), first

    def _ids(self, tokens: list) -> torch.Tensor:
        return torch.tensor(tokens, dtype=torch.long, device=self.split.device)

    def _accept(self, draft: Draft, target_logits: torch.Tensor, temperature: float,
                generator: torch.Generator | None) -> tuple[int, int]:
        """(accepted drafts, the verifier's next token): greedy, or speculative sampling against the
        drafts' own distribution (one-hot for copied drafts, which are deterministic)."""
        if draft.kind == "none":
            return 0, _next_token(target_logits, temperature, generator)
        ids = torch.tensor(draft.tokens, dtype=torch.long)
        if temperature == 0:
            return greedy_accept(ids, target_logits)
        p = torch.softmax(target_logits.double() / temperature, -1)
        if draft.kind in COPY_KIND.values():
            q = torch.nn.functional.one_hot(ids.to(p.device), p.shape[-1]).double()
        else:
            q = self._full_probs(torch.stack(draft.logits), temperature)
        return sampling_accept(ids, q, p, generator)

    def _full_probs(self, draft_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Head draft distributions [n, V_draft] -> over the full vocabulary [n, V], 0 outside."""
        q = torch.softmax(draft_logits.double() / temperature, -1)
        if self.head.vocab_ids is None:
            return q
        full = q.new_zeros(q.shape[0], self.split.config.vocab_size)
        return full.index_copy_(1, self.head.vocab_ids, q)

    def _meta(self, seq: Sequence, round_index: int, t_start: float) -> RoundMeta:
        opts = seq.options
        return RoundMeta(self.sink.run_id, self.sink.actor_id, opts.request_id, round_index,
                         self.head_version, opts.workload, t_start, time.time(), float(opts.temperature))

    def _topk(self) -> int:
        """The records' K, for both sides: a small draft vocabulary bounds it."""
        vocab = self.head.vocab_ids if self.head is not None else None
        return min(self.sink.topk, self.split.config.vocab_size if vocab is None else len(vocab))


def _next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """The verifier's own token after logits [1, V]: its argmax, or a sample at the temperature."""
    if temperature == 0:
        return int(logits.argmax(-1)[0])
    return int(torch.multinomial(torch.softmax(logits.double() / temperature, -1)[0], 1, generator=generator))

