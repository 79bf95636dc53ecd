"""MAL on the 40 held-out Spec-Bench greedy paths: n-gram drafts, the trained head, and combinations.

The script behind the n-gram rows and per-category table of docs/learning.md ("Heads compared").
Run from the project root with the venv, after `dvi online ... --out-dir runs/online_k4_v8k_e6_250`
(the best MLP head; see docs/learning.md): python docs/results/experiments/ngram_rules.py RESULTS.md
(exact simulation, nothing timed). Prints the tables and writes them to RESULTS.md.
"""
import sys
from collections import defaultdict

import numpy as np
import torch

torch.set_num_threads(1)  # the machine is shared

from dvi.config import load_config
from selfspec.drafter import load_head
from selfspec.greedy_paths import mean_accepted_length
from selfspec.model import load_model
from selfspec.ngram import NgramIndex, head_predictions, ngram_rule, simulate_ngram_rounds, switch_rule
from selfspec.proposal import Proposal
from selfspec.online import OnlineConfig, cached_paths_for, split_prompts


def head_rule():
    return lambda prop, head, conf: list(head)


def fill_rule(min_ngram):
    """The n-gram's drafts, then the head continues after them (from the trunk states of those drafts)."""
    def rule(prop, head, conf):
        follow = prop.tokens if prop.ngram >= min_ngram else []
        return follow + list(head[len(follow):])
    return rule


def confidence_rule(min_ngram, max_conf):
    """Token by token, the n-gram's draft unless the head is at least `max_conf` sure of its own;
    once the drafts leave the n-gram's continuation, the head alone goes on."""
    def rule(prop, head, conf):
        follow = prop.tokens if prop.ngram >= min_ngram else []
        drafts = []
        for j, (h, c) in enumerate(zip(head, conf)):
            drafts.append(follow[j] if j < len(follow) and c < max_conf else int(h))
            if j < len(follow) and drafts[j] != follow[j]:
                follow = []
        return drafts
    return rule


cfg = load_config(OnlineConfig, "configs/online.yaml")
model, tok = load_model(cfg.model)
_, _, held = split_prompts(cfg)
paths = cached_paths_for(model, tok, cfg, held)
_, head, _ = load_head(model, "runs/online_k4_v8k_e6_250")
head.eval()
preds = [head_predictions(p, head) for p in paths]
cats = sorted({p.category for p in paths})
print({c: sum(p.category == c for p in paths) for c in cats}, "new tokens", sum(len(p.tokens) - p.prompt_len for p in paths))


def run(rule, gamma, max_ngram=4):
    per_cat = defaultdict(list)
    for p, (d, c) in zip(paths, preds):
        per_cat[p.category] += simulate_ngram_rounds(p, gamma, rule, d, c, max_ngram)
    return per_cat


def accepted(drafts, target):
    return int(np.argmin(np.append(np.asarray(drafts) == target[:len(drafts)], False)))


def replay(p, gamma, round_accepts):
    """Greedy rounds along path p with an n-gram index of what is committed; round_accepts(q, n, index,
    proposal, target) says how many drafts the round accepted."""
    tokens, start, end = p.tokens, p.prompt_len, len(p.tokens) - 1
    index, q = NgramIndex(tokens[:start + 1]), 0
    while q < end - start:
        n = min(gamma, end - start - q - 1)
        prop = index.propose(n)
        acc = round_accepts(q, n, index, prop, tokens[start + q + 1:start + q + 1 + n])
        index.extend(tokens[start + q + 1:start + q + acc + 2])
        q += acc + 1


def oracle(gamma, min_ngram=1):
    """Per round the better of the n-gram's and the head's drafts (fewer drafts on a tie). Not realizable:
    an upper bound for any rule that picks one of the two per round."""
    per_cat = defaultdict(list)
    for p, (d, _) in zip(paths, preds):
        def better(q, n, index, prop, target):
            acc, neg_drafted = max((accepted(dr, target), -len(dr))
                                   for dr in (prop.tokens if prop.ngram >= min_ngram else [], list(d[q:q + n])))
            per_cat[p.category].append((-neg_drafted, acc))
            return acc
        replay(p, gamma, better)
    return per_cat


def capped(caps, fallback_to_head):
    """n-gram drafts, at most caps[matched length] of them; the head's drafts when there is no match."""
    def rule(prop, h, conf):
        if not prop.tokens:
            return list(h) if fallback_to_head else []
        return prop.tokens[:caps[min(prop.ngram, len(caps) - 1)]]
    return rule


rows = []


def add(name, gamma, per_cat):
    everything = [r for rs in per_cat.values() for r in rs]
    mal = np.mean([r[1] for r in everything]) + 1
    drafted = np.mean([r[0] for r in everything])
    acc = np.sum([r[1] for r in everything]) / max(1, np.sum([r[0] for r in everything]))
    cat_mal = [np.mean([r[1] for r in per_cat[c]]) + 1 for c in cats]
    rows.append((name, gamma, mal, drafted, acc, cat_mal))
    print(f"{name:45s} γ={gamma} MAL {mal:.3f} drafted {drafted:.2f} acc/draft {acc:.2f} " +
          " ".join(f"{c[:6]} {m:.2f}" for c, m in zip(cats, cat_mal)), flush=True)


for gamma in (4, 8):
    for lo, hi in ((1, 4), (2, 4), (3, 4), (4, 4), (1, 2), (1, 8), (2, 8), (3, 8)):
        add(f"n-gram, match {lo}..{hi}", gamma, run(ngram_rule(lo), gamma, hi))
    add("n-gram, 1 / 2 / γ drafts for match 1 / 2 / ≥3", gamma, run(capped([0, 1, 2, gamma], False), gamma))

# Variant not kept in selfspec/ngram.py: when the continuation runs into the end of the sequence (a
# loop of period d), keep copying it so that a match near the end still yields γ tokens.
plain_propose = NgramIndex.propose


def self_copy_propose(self, max_tokens, min_ngram=1, max_ngram=None):
    period = plain_propose(self, len(self.tokens), min_ngram, max_ngram)  # follower .. end of sequence
    out = []
    for j in range(max_tokens if period.tokens else 0):
        out.append(period.tokens[j] if j < len(period.tokens) else out[j - len(period.tokens)])
    return Proposal(out, period.ngram)


NgramIndex.propose = self_copy_propose
for gamma in (4, 8):
    add("n-gram, match 1..4, loops copied past the end", gamma, run(ngram_rule(1), gamma))
NgramIndex.propose = plain_propose

for gamma in (4, 8):
    add("head", gamma, run(head_rule(), gamma))
    assert abs(rows[-1][2] - mean_accepted_length(paths, head, gamma)) < 1e-9  # agrees with simulate_rounds
    for t in (1, 2, 3, 4):
        add(f"switch: n-gram if match ≥ {t}, else head", gamma, run(switch_rule(t), gamma))
    for t in (1, 2):
        add(f"fill: n-gram (match ≥ {t}), head after it", gamma, run(fill_rule(t), gamma))
    for t in (1, 2):
        for tau in (0.5, 0.7, 0.9):
            add(f"conf: n-gram (match ≥ {t}) unless head p ≥ {tau}", gamma, run(confidence_rule(t, tau), gamma))
    add("n-gram 1 / 2 / γ drafts for match 1 / 2 / ≥3, else head", gamma,
        run(capped([0, 1, 2, gamma], True), gamma))
    for t in (1, 2):
        add(f"oracle per round: n-gram (match ≥ {t}) or head", gamma, oracle(gamma, t))


class ResponseCorpus:
    """Not built into the engine: an index of earlier *responses* across requests (suffix-tree drafting
    over served traffic). Per suffix of length min_n..max_n, counts of the next token; a proposal
    follows the longest suffix whose most common next token holds a majority, token by token."""
    def __init__(self, min_n=1, max_n=4):
        self.min_n, self.max_n = min_n, max_n
        self.next = defaultdict(lambda: defaultdict(int))

    def add(self, toks):
        toks = [int(t) for t in toks]
        for i in range(self.min_n, len(toks)):
            for n in range(self.min_n, min(self.max_n, i) + 1):
                self.next[tuple(toks[i - n:i])][toks[i]] += 1

    def propose(self, seq, k):
        seq, out, first_n = list(seq[-self.max_n:]), [], 0
        while len(out) < k:
            for n in range(min(self.max_n, len(seq)), self.min_n - 1, -1):
                counts = self.next.get(tuple(seq[-n:]))
                if counts and 2 * max(counts.values()) >= sum(counts.values()):
                    break
            else:
                break
            first_n = first_n or n
            out.append(max(counts, key=counts.get))
            seq.append(out[-1])
        return Proposal(out, first_n)


train, _, _ = split_prompts(cfg)
train_paths = cached_paths_for(model, tok, cfg, train)
for min_match in (1, 2, 3):
    for with_head in (False, True):
        corpus, per_cat, gamma = ResponseCorpus(), defaultdict(list), 4
        for tp in train_paths:
            corpus.add(tp.tokens[tp.prompt_len:])
        for p, (d, _) in zip(paths, preds):  # in serving order: each response joins the corpus once served
            def corpus_round(q, n, index, prop, target, p=p, d=d):
                drafts = prop.tokens
                if not drafts and n:
                    other = corpus.propose(index.tokens, n)
                    drafts = other.tokens if other.ngram >= min_match else (list(d[q:q + n]) if with_head else [])
                per_cat[p.category].append((len(drafts), accepted(drafts, target)))
                return per_cat[p.category][-1][1]
            replay(p, gamma, corpus_round)
            corpus.add(p.tokens[p.prompt_len:])
        add(f"n-gram, else earlier responses (match ≥ {min_match})" + (", else head" if with_head else ""), gamma,
            per_cat)

# Where the n-gram wins: along the n-gram-only rounds at γ=4, by matched length and by head confidence.
gamma = 4
by_len, by_conf = defaultdict(list), defaultdict(list)
for p, (d, c) in zip(paths, preds):
    def ngram_round(q, n, index, prop, target, p=p, d=d, c=c):
        a_ng, a_head = accepted(prop.tokens, target), accepted(list(d[q:q + n]), target)
        if n:
            in_prompt = bool(prop.ngram) and index._follower[prop.ngram - 1][tuple(index.tokens[-prop.ngram:])] < p.prompt_len
            by_len[prop.ngram].append((a_ng, a_head, in_prompt))
            if prop.ngram:
                by_conf[min(int(c[q] * 5), 4)].append((a_ng > 0, a_head > 0))
        return a_ng
    replay(p, gamma, ngram_round)

with open(sys.argv[1], "w") as f:
    f.write("# N-gram drafts on the 40 held-out Spec-Bench greedy paths (SmolLM2-135M, 128 new tokens)\n\n"
            f"{len(paths)} paths, {sum(len(p.tokens) - p.prompt_len for p in paths)} generated tokens; "
            "head = runs/online_k4_v8k_e6_250 (k=4, 8k draft vocab). Exact simulation along the greedy path. "
            "MAL = accepted drafts + 1 per verification round; per-category columns are MAL.\n\n")
    f.write("| drafts | γ | MAL | drafted/round | accepted/drafted | " + " | ".join(cats) + " |\n")
    f.write("|---|---|---|---|---|" + "---|" * len(cats) + "\n")
    for name, g, mal, drafted, acc, cat_mal in rows:
        f.write(f"| {name} | {g} | {mal:.3f} | {drafted:.2f} | {acc:.2f} | " + " | ".join(f"{m:.2f}" for m in cat_mal) + " |\n")
    f.write("\n## N-gram-only rounds (γ=4, match 1..4) by matched length\n\n"
            "| matched length | rounds | n-gram accepted/round | head accepted/round, same rounds | match found in the prompt |\n|---|---|---|---|---|\n")
    for k in sorted(by_len):
        r = np.array(by_len[k], float)
        f.write(f"| {k} | {len(r)} | {r[:, 0].mean():.2f} | {r[:, 1].mean():.2f} | {r[:, 2].mean() if k else 0:.0%} |\n")
    f.write("\n## Rounds with a match (γ=4), by the head's confidence in its first draft\n\n"
            "| head max prob | rounds | n-gram 1st draft accepted | head 1st draft accepted |\n|---|---|---|---|\n")
    for k in sorted(by_conf):
        r = np.array(by_conf[k], float)
        f.write(f"| {k / 5:.1f}-{(k + 1) / 5:.1f} | {len(r)} | {r[:, 0].mean():.0%} | {r[:, 1].mean():.0%} |\n")
