"""Would verifying several draft candidates at once (a token tree, as SpecInfer / Medusa / EAGLE-2 do)
pay on this CPU? Simulated, not built: the script behind "Trees of candidates" in docs/learning.md.

Along the 40 held-out greedy paths, each round may verify up to C copied continuations (every earlier
occurrence of the longest matching suffix, most recent first, then shorter suffixes; distinct
continuations only) and optionally the MLP head's drafts, all in one tree. A round accepts the longest
agreeing prefix of any candidate, as tree verification would. Its cost is a linear fit to
`measure_step_costs` on the 2-core AVX2 CPU (ms): a block of m tokens through the trunk costs
8 + 0.8 (m - 1), verifying m tree nodes 60 + 5 (m - 1), and each head draft a trunk step and a head
call, 10.5. Plain decoding is 68 per token. The tree's rows are the trie of its candidates.

Run from the project root with the venv, after `dvi online ... --out-dir runs/online_k4_v8k_e6_250`
(docs/learning.md): python docs/results/experiments/copy_trees.py
"""
from collections import defaultdict

import numpy as np
import torch

from dvi.config import load_config
from selfspec.drafter import load_head
from selfspec.model import load_model
from selfspec.ngram import MAX_NGRAM, head_predictions
from selfspec.online import OnlineConfig, cached_paths_for, split_prompts

TRUNK, TRUNK_ROW, VERIFY, VERIFY_ROW, HEAD_DRAFT = 8.0, 0.8, 60.0, 5.0, 10.5
PLAIN = TRUNK + VERIFY


class AllOccurrences:
    """Like selfspec.ngram.NgramIndex, but remembers every occurrence of each n-gram."""

    def __init__(self, tokens):
        self.tokens: list[int] = []
        self.followers = [defaultdict(list) for _ in range(MAX_NGRAM)]
        self.extend(tokens)

    def extend(self, tokens):
        for token in tokens:
            self.tokens.append(int(token))
            i = len(self.tokens) - 1
            for n in range(1, min(MAX_NGRAM, i) + 1):
                self.followers[n - 1][tuple(self.tokens[i - n:i])].append(i)

    def candidates(self, length: int, most: int) -> list[list[int]]:
        found: list[tuple[int, ...]] = []
        for n in range(min(MAX_NGRAM, len(self.tokens)), 0, -1):
            for f in reversed(self.followers[n - 1].get(tuple(self.tokens[-n:]), [])):
                cand = tuple(self.tokens[f:f + length])
                if cand and not any(seen[:len(cand)] == cand for seen in found):
                    found.append(cand)
                if len(found) == most:
                    return [list(c) for c in found]
        return [list(c) for c in found]


def accepted(drafts, target) -> int:
    return int(np.argmin(np.append(np.asarray(drafts) == target[:len(drafts)], False)))


def round_cost(candidates, head_drafts: int) -> float:
    rows = 1 + len({tuple(c[:j + 1]) for c in candidates for j in range(len(c))})
    return TRUNK + TRUNK_ROW * (rows - 1) + VERIFY + VERIFY_ROW * (rows - 1) + HEAD_DRAFT * head_drafts


def simulate(paths, preds, gamma: int, most: int, head: str) -> tuple[float, float]:
    """(MAL, estimated speedup over plain decoding). head: "no", "fallback" (when nothing is copied) or
    "always" (the head's drafts join every tree)."""
    tokens_out = rounds = 0
    time = 0.0
    for path, (head_drafts, _) in zip(paths, preds):
        tokens, start = path.tokens, path.prompt_len
        end = len(tokens) - 1
        index, p = AllOccurrences(tokens[:start + 1]), 0
        while p < end - start:
            n = min(gamma, end - start - p - 1)
            cands = index.candidates(n, most) if n > 0 else []
            drafted = 0
            if n > 0 and (head == "always" or (head == "fallback" and not cands)):
                cands, drafted = cands + [list(head_drafts[p:p + n])], n
            target = tokens[start + p + 1:start + p + 1 + n]
            n_acc = max((accepted(c, target) for c in cands), default=0)
            rounds, tokens_out = rounds + 1, tokens_out + n_acc + 1
            time += round_cost(cands, drafted) if cands else PLAIN
            index.extend(tokens[start + p + 1:start + p + n_acc + 2])
            p += n_acc + 1
    return tokens_out / rounds, PLAIN * tokens_out / time


def main():
    torch.set_num_threads(2)
    cfg = load_config(OnlineConfig, "configs/online.yaml")
    model, tok = load_model(cfg.model)
    paths = cached_paths_for(model, tok, cfg, split_prompts(cfg)[2])
    _, head, _ = load_head(model, "runs/online_k4_v8k_e6_250")
    preds = [head_predictions(p, head.eval()) for p in paths]
    print("| γ | copied candidates ≤ | head | MAL | est. speedup over plain |\n|---|---|---|---|---|")
    for gamma in (4, 8):
        for most in (1, 2, 3, 4):
            for head_use in ("no", "fallback", "always"):
                mal, speedup = simulate(paths, preds, gamma, most, head_use)
                print(f"| {gamma} | {most} | {head_use} | {mal:.3f} | {speedup:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
