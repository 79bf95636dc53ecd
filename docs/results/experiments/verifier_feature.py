"""Exploratory, offline: does the verifier's own last hidden state help the MLP head draft?

Each verification already computes the full model's final hidden state at every verified position.
When a round starts with the pending token at r, the verifier's state at r-1 (the one that chose
token r) is known, and it is far deeper than the layer-k trunk state. EAGLE drafts from the target
model's top-layer features; here the MLP head gets h_k(u) + W·F(r-1) for every drafted position u
of the round (W zero-initialised, so it starts as the plain head).

    python docs/results/experiments/verifier_feature.py base|feat EPOCHS LR

Training is teacher forcing over the 250 cached training paths with the staleness u - r drawn from
0..γ-1; MAL is simulated exactly, round by round, on the 40 held-out paths.
"""
import sys
import time

import numpy as np
import torch
from torch import nn

from dvi.config import load_config
from selfspec.drafter import DrafterHead, HeadConfig
from selfspec.cache import cache_dir
from selfspec.model import load_model
from selfspec.online import OnlineConfig, cached_paths_for, frequent_ids, split_prompts
from selfspec.split import SplitModel

torch.manual_seed(0)
mode, epochs, lr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
GAMMA = 4
torch.set_num_threads(2)
cfg = load_config(OnlineConfig, "configs/online.yaml")
model, tok = load_model(cfg.model)
train, _, held = split_prompts(cfg)
tp = cached_paths_for(model, tok, cfg, train); hp = cached_paths_for(model, tok, cfg, held)

cache = cache_dir() / f"verifier_final_{len(tp)}_{len(hp)}.npz"  # F at every position, train then held-out
if not cache.exists():
    with torch.inference_mode():
        finals = [model(torch.tensor([p.tokens.tolist()]), output_hidden_states=True).hidden_states[-1][0].half().numpy()
                  for p in tp + hp]
    np.savez(cache, *finals)
data = np.load(cache)
finals = [data[f"arr_{i}"] for i in range(len(tp) + len(hp))]
tf, hf = finals[:len(tp)], finals[len(tp):]

split = SplitModel(model, 4)
head = DrafterHead(split, HeadConfig(adapter_hidden=1024, draft_vocab=8192), frequent_ids(tp, split, 8192))
d = split.config.hidden_size
fuse = nn.Linear(d, d)
nn.init.zeros_(fuse.weight); nn.init.zeros_(fuse.bias)
use_feat = mode == "feat"
vids = head.vocab_ids


def logits(h, f):  # h [n, d] trunk states of drafted positions, f [n, d] verifier state before the round
    return head(h + fuse(f)) if use_feat else head(h)


def mal(paths, fins):
    rounds, first = [], []
    with torch.no_grad():
        for p, F in zip(paths, fins):
            s, e = p.prompt_len, len(p.tokens) - 1
            H = torch.from_numpy(p.hidden[:e]).float(); F = torch.from_numpy(F).float()
            q = 0
            while q < e - s:
                n = min(GAMMA, e - s - q - 1)
                r = s + q
                if n > 0:
                    lg = logits(H[r:r + n], F[r - 1].expand(n, -1))
                    match = vids[lg.argmax(-1)].numpy() == p.tokens[r + 1:r + n + 1]
                    a = int(np.argmin(np.append(match, False)))
                    first.append(bool(match[0]))
                else:
                    a = 0
                rounds.append(a); q += a + 1
    return float(np.mean(rounds) + 1), float(np.mean(first))


def kl_loss(lg, tids, tlp):
    logq = torch.log_softmax(lg, -1)
    ids = torch.as_tensor(tids, dtype=torch.long)
    idx = torch.searchsorted(vids, ids).clamp_max(len(vids) - 1)
    hit = vids[idx] == ids
    p = torch.as_tensor(tlp).exp().masked_fill(~hit, 0)
    rest = (1 - p.sum(1)).clamp_min(1e-8)
    inside = torch.zeros_like(logq, dtype=torch.bool).scatter_(1, idx, hit)
    return -((p * logq.gather(1, idx)).sum(1) + rest * logq.masked_fill(inside, -float("inf")).logsumexp(1)).mean()


params = [p for p in head.parameters() if p.requires_grad] + (list(fuse.parameters()) if use_feat else [])
opt = torch.optim.AdamW(params, lr=lr)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * ((len(tp) + 3) // 4), pct_start=0.05)
print(mode, "before: held-out MAL, first-draft acceptance", mal(hp, hf), flush=True)
t0 = time.time()
rng = np.random.RandomState(0)
for ep in range(epochs):
    order = rng.permutation(len(tp))
    for b in range(0, len(order), 4):
        loss = 0
        for i in order[b:b + 4]:
            p, F = tp[i], tf[i]
            s, e = p.prompt_len, len(p.tokens) - 1
            u = np.arange(s, e)
            r = np.maximum(u - rng.randint(0, GAMMA, size=len(u)), s)  # round start: u drafted u - r steps in
            h = torch.from_numpy(p.hidden[u]).float(); f = torch.from_numpy(F[r - 1]).float()
            loss = loss + kl_loss(logits(h, f), p.target_topk_ids[u], p.target_topk_logprobs[u])
        opt.zero_grad(); (loss / 4).backward(); opt.step(); sched.step()
    print(f"epoch {ep} {time.time() - t0:.0f}s loss {loss.item() / 4:.3f} held-out MAL, first-draft acceptance "
          f"{mal(hp, hf)} train (40) {mal(tp[:40], tf[:40])}", flush=True)
