"""Lossless self-speculative decoding of one request (batch 1).

A round: draft (copy what followed an earlier occurrence of the text's suffix, or let the head draft
from its layer-k hidden state, each draft also going through the trunk; or draft nothing) -> verify
(layers [k, L) on the pending token and all drafts in one pass, reusing the trunk's hidden states and
KV) -> accept (the longest agreeing prefix plus one verifier token) -> observe (the length policy
learns what paid) -> emit (the round's Transition for the learner, built by selfspec.transitions) ->
commit (roll the caches back to what was kept; the verifier's token becomes the pending one).
Prefill is no round: it verifies the prompt, whose next token is the first pending one.
γ=0 is plain decoding: every round is one without drafts.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable, Generator

import numpy as np
import torch

from selfspec.acceptance import greedy_accept, mean_accepted_length, sampling_accept
from selfspec.passes import PassRunner, pass_runner
from selfspec.drafter import DrafterHead
from selfspec.length_policy import LengthPolicy, RoundOutcome, Shadow
from selfspec.model import eos_ids as model_eos_ids
from selfspec.ngram import MAX_NGRAM, NgramIndex, Proposal
from selfspec.split import SplitModel
from selfspec.transitions import (Prefill, RoundMeta, Transition, VerifiedRound, prompt_transition,
                                  round_transition)


@dataclass
class RoundStats:
    drafted: int
    accepted: int
    t_draft: float  # proposing drafts: n-gram lookup, head calls and the drafts' trunk passes
    t_verify: float  # the pending token's trunk pass, verification and acceptance


@dataclass
class DecodeResult:
    tokens: list[int]
    rounds: list[RoundStats] = field(default_factory=list)
    stop_reason: str = "length"  # "eos", "length", or "stop" (the caller ended it: a stop sequence)
    t_prefill: float = 0.0
    t_total: float = 0.0

    @property
    def mean_accepted_length(self) -> float:
        return mean_accepted_length(r.accepted for r in self.rounds)


@dataclass
class DecodeOptions:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    seed: int | None = None
    eos_ids: set[int] | None = None  # None: the model's own
    request_id: str | None = None
    workload: str = ""  # tag carried by the request's transitions


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
    """One round's drafts and what verifying them needs."""
    kind: str  # "copied" (n-gram), "drafted" (head) or "none" (a round without drafts)
    hiddens: list[torch.Tensor]  # layer-k hidden [1, m, d]: the pending token, then each draft
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # head drafts, over the draft vocab
    confidences: list[float] = field(default_factory=list)  # head drafts: top probability
    shadow: Shadow | None = None  # the head's greedy choice when the policy drafted nothing

    @property
    def hidden(self) -> torch.Tensor:
        return torch.cat(self.hiddens, 1)


@dataclass
class _Request:
    """Decoding state between rounds: caches cover [0, position); `pending` sits at `position`."""
    options: DecodeOptions
    cache: object
    pending: int
    position: int
    budget: int  # new tokens still allowed, the pending one already counted
    generator: torch.Generator | None
    rounds: int = 0
    history: list[torch.Tensor] = field(default_factory=list)  # committed trunk hiddens
    head_cache: object = None  # attention heads: their own KV cache over the trunk hiddens
    ngram: NgramIndex | None = None  # committed tokens, for copied drafts


class SelfSpecDecoder:
    def __init__(self, split: SplitModel, head: DrafterHead | None = None,
                 length_policy: LengthPolicy | None = None, ngram: int = 0, sink: TransitionSink | None = None,
                 passes: PassRunner | None = None):
        """`passes`: what runs the passes (selfspec.passes; None: `pass_runner(split)`, CUDA graphs on
        a GPU, the split itself elsewhere); give the one a cost-aware policy was measured on."""
        self.split, self.sink = split, sink
        self.passes = passes if passes is not None else pass_runner(split)
        self.length_policy = length_policy or LengthPolicy(0)
        if not 0 <= ngram <= MAX_NGRAM:
            raise ValueError(f"ngram (shortest suffix match to copy drafts from, 0 = off) must "
                             f"be in [0, {MAX_NGRAM}], got {ngram}")
        self.ngram = ngram
        if self.length_policy.max_drafts > 0 and head is None and not ngram:
            raise ValueError("drafting (gamma > 0) needs a drafter head or n-gram drafts")
        self.set_head(head)

    def set_head(self, head: DrafterHead | None, version: int = 0) -> None:
        """Swap the drafter head (between requests): output never changes, only speed. `version`
        goes into the transitions it drafts."""
        self.head, self.head_version = head, version
        self.window = head.config.context_window if head is not None else 0

    def generate(self, prompt_ids, options: DecodeOptions | None = None,
                 **overrides) -> DecodeResult:
        """Decode one request; `overrides` set DecodeOptions fields (max_new_tokens=...)."""
        steps = self.stream(prompt_ids, options, **overrides)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    @torch.inference_mode()
    def stream(self, prompt_ids, options: DecodeOptions | None = None,
               **overrides) -> Generator[list[int], bool | None, DecodeResult]:
        """Decode one request, yielding the tokens each step adds (prefill's first one, then each round's);
        the DecodeResult is the generator's return value. `send(True)` ends the request there (a stop
        sequence matched: stop_reason "stop"); closing it abandons the request (a client that left)."""
        opts = replace(options or DecodeOptions(), **overrides)
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=self.split.device).flatten()
        budget = self._check(prompt.numel(), opts)
        eos = opts.eos_ids if opts.eos_ids is not None else model_eos_ids(self.split.config)
        clock = _Clock()
        with clock("prefill"):
            req = self._prefill(prompt, budget, opts)
        result = DecodeResult([req.pending], t_prefill=clock["prefill"])
        result.stop_reason = "eos" if req.pending in eos else "length"
        stop = yield [req.pending]
        while not stop and req.budget > 0 and result.stop_reason != "eos":
            stats, emitted = self._round(req)
            result.rounds.append(stats)
            new = []
            for tok in emitted:
                new.append(tok)
                if tok in eos:
                    result.stop_reason = "eos"
                    break
            result.tokens += new
            stop = yield new
        if stop:
            result.stop_reason = "stop"
        result.t_total = clock.elapsed()
        return result

    def _check(self, prompt_len: int, opts: DecodeOptions) -> int:
        """The new-token budget, or a clear error for a request that cannot run."""
        limit = self.split.max_positions
        if prompt_len == 0:
            raise ValueError("empty prompt: give at least one token")
        if prompt_len >= limit:
            raise ValueError(f"prompt has {prompt_len} tokens but the model has {limit} positions; "
                             f"shorten it to at most {limit - 1}")
        if opts.temperature < 0 or not np.isfinite(opts.temperature):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {opts.temperature}")
        if opts.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {opts.max_new_tokens}")
        return min(opts.max_new_tokens, limit - prompt_len)

    def _prefill(self, prompt: torch.Tensor, budget: int, opts: DecodeOptions) -> _Request:
        """Run the prompt through the whole model; its next token, the verifier's own (nothing was
        drafted), becomes the first pending one."""
        cache = self.passes.new_cache(prompt.numel() + budget + self.length_policy.max_drafts + 1)
        generator = None
        if opts.temperature > 0 and opts.seed is not None:
            generator = torch.Generator(self.split.device).manual_seed(opts.seed)
        hidden = self.passes.trunk(prompt, 0, cache)
        logits = self.passes.verify(hidden, 0, cache)
        first = _next_token(logits[-1:], opts.temperature, generator)
        opts = replace(opts, request_id=opts.request_id or uuid.uuid4().hex[:12])
        req = _Request(opts, cache, first, prompt.numel(), budget - 1, generator)
        if self.sink is not None and self.sink.prompt_rows:
            self.sink.write(prompt_transition(self._meta(req, 0, time.time()), Prefill(prompt, hidden, logits, first),
                                             self.sink.prompt_rows, self._topk()))
        if self.window:
            req.history = list(hidden[0, -self.window:])
        if self.head is not None:
            req.head_cache = self.head.new_cache(cache.capacity)
        if self.ngram:
            req.ngram = NgramIndex([*prompt.tolist(), first])
        return req

    def _round(self, req: _Request) -> tuple[RoundStats, list[int]]:
        """draft -> verify -> accept -> observe -> emit -> commit."""
        req.rounds += 1
        clock, t_start = _Clock(), time.time()
        room = min(self.length_policy.max_drafts, req.budget - 1)  # keep a slot for the bonus token
        with clock("draft"):
            proposal, copied = self._copies(req, room)
        with clock("verify"):  # copied drafts need no head: they go through the trunk with the pending token
            pending = self.passes.trunk(self._ids([req.pending, *copied]), req.position, req.cache)
        with clock("draft"):
            if copied:
                draft = Draft("copied", [pending], copied)
            elif room > 0 and self.head is not None and self.length_policy.start_round():
                draft = self._head_draft(req, pending, room)
            else:
                draft = Draft("none", [pending])
        with clock("verify"):
            hidden = draft.hidden  # [1, 1 + drafts, d]: one pass over layers [k, L) verifies them all
            logits = self.passes.verify(hidden, req.position, req.cache)
            n_acc, bonus = self._accept(draft, logits, req.options.temperature, req.generator)
        emitted = draft.tokens[:n_acc] + [bonus]  # fits the budget: room kept a slot for the bonus
        self.length_policy.observe(RoundOutcome(proposal, draft.confidences, draft.shadow, n_acc, emitted))
        if self.sink is not None:  # before commit: the record's context is the window before this round
            context = req.history[-self.window:] if self.window else []
            verified = VerifiedRound(draft, hidden, context, logits, emitted)
            self.sink.write(round_transition(self._meta(req, req.rounds, t_start), verified, self._topk(), self.head))
        self._commit(req, hidden, n_acc, emitted)
        return RoundStats(len(draft.tokens), n_acc, clock["draft"], clock["verify"]), emitted

    def _copies(self, req: _Request, room: int) -> tuple[Proposal, list[int]]:
        """The n-gram proposal and as much of it as the length policy expects to pay."""
        if req.ngram is None or room == 0:
            return Proposal([], 0), []
        proposal = req.ngram.propose(room, self.ngram)
        if not proposal.tokens:
            return proposal, []
        return proposal, proposal.tokens[:self.length_policy.ngram_drafts(proposal.ngram,
                                                                  len(proposal.tokens))]

    def _head_draft(self, req: _Request, pending: torch.Tensor, room: int) -> Draft:
        """Draft with the head while the length policy keeps going, each draft through the trunk.
        When it keeps none (a round without drafts), the head's greedy choice becomes a shadow,
        judged for free by this round's token."""
        temperature, draft = req.options.temperature, Draft("none", [pending])
        new, start = self._unseen_by_head(req, pending)
        while len(draft.tokens) < room:
            logits = self.passes.head_logits(self.head, new, start, req.head_cache).float()
            logp = torch.log_softmax(logits / temperature if temperature else logits, -1)
            top = float(logp.max().exp())
            if not self.length_policy.keep(len(draft.tokens), top, float(-(logp.exp() * logp).sum())):
                if not draft.tokens and temperature == 0:
                    draft.shadow = Shadow(top, int(self.head.to_full_ids(logp.argmax())))
                break
            idx = (torch.multinomial(logp.exp(), 1, generator=req.generator)[0] if temperature
                   else logp.argmax())
            draft.kind = "drafted"
            draft.tokens.append(int(self.head.to_full_ids(idx)))
            draft.logits.append(logits)
            draft.confidences.append(top)
            start = req.position + len(draft.tokens)
            new = self.passes.trunk(self._ids(draft.tokens[-1:]), start, req.cache)
            draft.hiddens.append(new)
        return draft

    def _commit(self, req: _Request, hidden: torch.Tensor, n_acc: int, emitted: list[int]) -> None:
        """Keep the pending token and the accepted drafts; the bonus token becomes pending. The one
        place where caches roll back (a rollback is lowering lengths: no copies)."""
        kept = req.position + n_acc + 1
        req.cache.crop(kept)
        if req.head_cache is not None:
            req.head_cache.crop(kept)
        if self.window:
            req.history.extend(hidden[0, : n_acc + 1])
            del req.history[:-self.window]
        if req.ngram is not None:
            req.ngram.extend(emitted)
        req.position, req.pending, req.budget = kept, emitted[-1], req.budget - len(emitted)

    def _unseen_by_head(self, req: _Request, pending: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The layer-k hiddens an attention head has yet to see (committed positions within its
        window it skipped in rounds without drafts, then the pending token) and the first one's
        position."""
        if req.head_cache is None:
            return pending, req.position
        first = max(req.head_cache.length(0), req.position - len(req.history))
        missed = req.history[len(req.history) - (req.position - first):]
        return (torch.cat([torch.stack(missed)[None], pending], 1) if missed else pending), first

    def _ids(self, tokens: list[int]) -> torch.Tensor:
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
        if draft.kind == "copied":
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

    def _meta(self, req: _Request, round_index: int, t_start: float) -> RoundMeta:
        opts = req.options
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


class _Clock:
    """Seconds spent in named spans, summed where a name recurs: `with clock("verify"): ...` (spans do
    not nest), then clock["verify"]."""

    def __init__(self):
        self.started, self.spans, self._name, self._t = time.perf_counter(), {}, "", 0.0

    def __call__(self, name: str) -> _Clock:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._t = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.spans[self._name] = self[self._name] + time.perf_counter() - self._t

    def __getitem__(self, name: str) -> float:
        return self.spans.get(name, 0.0)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
