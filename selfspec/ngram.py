"""Near-free draft candidates from n-grams of the sequence itself (prompt lookup decoding).

Summaries, RAG answers, code edits and the small model's own loops repeat spans already in the
context. `NgramIndex` finds the most recent earlier occurrence of the longest suffix of the
committed tokens and proposes what followed it; the matched length says how much to trust it.

`simulate_ngram_rounds` replays greedy decoding of a `GreedyPath` with drafts chosen by a rule
from the n-gram proposal and/or the drafter head, exactly as `greedy_paths.simulate_rounds` does
for the head alone: along the path, a draft matters only while every earlier draft of its round
was accepted, and then its context is the path's, so the head's draft is its argmax there.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

from selfspec.acceptance import mean_accepted_length
from selfspec.proposal import Proposal


MAX_NGRAM = 4  # longer matches barely change acceptance on Spec-Bench (docs/learning.md)




class NgramIndex:
    def __init__(self, tokens=(), max_ngram: int = MAX_NGRAM):
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        # Per n: n-gram -> position of the token that followed its latest occurrence. An n-gram is
        # registered only once its follower exists, so the current suffix never matches itself.
        self._follower: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram)]
        self.extend(tokens)

    def extend(self, tokens) -> None:
        for token in tokens:
            self.tokens.append(int(token))
            i = len(self.tokens) - 1
            for n in range(1, min(self.max_ngram, i) + 1):
                self._follower[n - 1][tuple(self.tokens[i - n:i])] = i

    def propose(self, max_tokens: int, min_ngram: int = 1, max_ngram: int | None = None) -> Proposal:
        max_ngram = self.max_ngram if max_ngram is None else max_ngram
        if not 1 <= min_ngram <= max_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram <= {self.max_ngram}, got {min_ngram}, {max_ngram}")
        seq = self.tokens
        for n in range(min(max_ngram, len(seq)), min_ngram - 1, -1):
            follower = self._follower[n - 1].get(tuple(seq[-n:]))
            if follower is not None:
                return Proposal(seq[follower:follower + max_tokens], n)
        return Proposal([], 0)


class Round(NamedTuple):
    drafted: int
    accepted: int


# (n-gram proposal, head drafts, head confidences) -> drafts. The head's arrays hold its argmax and
# max probability at this round's positions as if every earlier draft were accepted, which is all
# that can matter: after the first reject nothing more is accepted.
Rule = Callable[[Proposal, np.ndarray, np.ndarray], list[int]]


def ngram_rule(min_ngram: int = 1) -> Rule:
    return lambda prop, head, conf: prop.tokens if prop.ngram >= min_ngram else []


def switch_rule(min_ngram: int) -> Rule:
    """The n-gram's drafts when its match is long enough, else the head's."""
    return lambda prop, head, conf: prop.tokens if prop.ngram >= min_ngram else list(head)


def simulate_ngram_rounds(path, gamma: int, rule: Rule, head_drafts: np.ndarray | None = None,
                          head_conf: np.ndarray | None = None, max_ngram: int = MAX_NGRAM) -> list[Round]:
    """Replay greedy decoding of `path` (a GreedyPath: tokens, prompt_len) with at most γ drafts a round
    chosen by `rule`. head_drafts[i] / head_conf[i]: the head's argmax token / max probability at
    position prompt_len + i (see `head_predictions`); the head-free rules need neither.

    The first generated token comes from prefill; each round the index holds the prompt and every
    committed token up to and including the pending one, at prompt_len + p."""
    tokens, start = path.tokens, path.prompt_len
    end = len(tokens) - 1
    no_head = np.zeros(0)  # rules that need the head get no drafts from it
    head_drafts = no_head if head_drafts is None else head_drafts
    head_conf = no_head if head_conf is None else head_conf
    index = NgramIndex(tokens[:start + 1], max_ngram)
    rounds, p = [], 0
    while p < end - start:
        n = min(gamma, end - start - p - 1)  # the bonus token needs one slot of what is left
        drafts = rule(index.propose(n), head_drafts[p:p + n], head_conf[p:p + n])[:n]
        target = tokens[start + p + 1:start + p + 1 + len(drafts)]
        n_acc = int(np.argmin(np.append(np.asarray(drafts) == target, False)))
        rounds.append(Round(len(drafts), n_acc))
        index.extend(tokens[start + p + 1:start + p + n_acc + 2])  # the accepted drafts and the bonus token
        p += n_acc + 1
    return rounds


def head_predictions(path, head) -> tuple[np.ndarray, np.ndarray]:
    """The head's argmax draft (full-vocabulary id) and its probability at positions prompt_len..len-2."""
    param = next(head.parameters())
    with torch.no_grad():
        hidden = torch.from_numpy(path.hidden[:-1]).to(param.device, param.dtype)
        probs = torch.softmax(head.path_logits(hidden, path.prompt_len, len(hidden)).float(), -1)
    conf, idx = probs.max(-1)
    return head.to_full_ids(idx).cpu().numpy(), conf.cpu().numpy()


def mean_accepted_length_with_ngram(paths, gamma: int, head=None, min_ngram: int = 1) -> float:
    """MAL along these paths with copied drafts when the suffix matches, else the head's (none without
    a head): what `SelfSpecDecoder(..., CopySources(ngram=min_ngram))` with fixed γ decides."""
    rule = ngram_rule(min_ngram) if head is None else switch_rule(min_ngram)
    return mean_accepted_length(r.accepted for path in paths
                                for r in simulate_ngram_rounds(path, gamma, rule, *(head_predictions(path, head) if head else ())))
