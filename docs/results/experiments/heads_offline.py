"""Exploratory, offline: train a drafter head by teacher forcing over whole cached greedy paths (not
the online loop), to see what a head can reach when every position is seen many times. This is the
script behind the "offline" rows of docs/learning.md ("Heads compared"), kept as it ran.

    python docs/results/experiments/heads_offline.py attn|mlp|lora PROMPT_POSITIONS(0|1) EPOCHS LR [WINDOW]

attn: the model's decoder layer 4 copied as a trainable attention adapter over the trunk's hidden
states (whole causal context, or WINDOW positions), no MLP adapter; mlp: the default MLP adapter;
lora: the MLP adapter on top of a copy of the trunk (layers 0-3) with LoRA r=16 on every linear
layer, as DVI's code drafts (the trunk hidden states are recomputed from the tokens).
Both: own norm, LoRA'd output projection over the 8,192 ids the model emits most. Loss: forward KL
to the verifier's stored top-32 with a rest bucket; batches of 4 paths, AdamW, one-cycle schedule.
Uses configs/online.yaml's prompts and the greedy paths `dvi online` caches.
"""
import copy
import math
import sys
import time

import numpy as np
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from dvi.config import load_config
from selfspec.drafter import DrafterHead, HeadConfig
from selfspec.model import load_model
from selfspec.online import OnlineConfig, cached_paths_for, frequent_ids, split_prompts
from selfspec.split import SplitModel

torch.manual_seed(0)
mode = sys.argv[1]            # mlp | attn | lora
use_prompt = sys.argv[2] == "1"
epochs = int(sys.argv[3]); lr = float(sys.argv[4]); window = int(sys.argv[5]) if len(sys.argv) > 5 else 0
torch.set_num_threads(2)
cfg = load_config(OnlineConfig, "configs/online.yaml")
model, tok = load_model(cfg.model)
train, _, held = split_prompts(cfg)
tp = cached_paths_for(model, tok, cfg, train); hp = cached_paths_for(model, tok, cfg, held)
split = SplitModel(model, 4)
hc = HeadConfig(adapter_hidden=0 if mode == "attn" else 1024, draft_vocab=8192)
vocab = frequent_ids(tp, split, 8192)
head = DrafterHead(split, hc, vocab)
layer = None
if mode == "attn":
    layer = copy.deepcopy(split.layers[4])
    for p in layer.parameters(): p.requires_grad_(True)
trunk = None
if mode == "lora":
    trunk = nn.Module()
    trunk.layers = copy.deepcopy(split.layers[:4])
    inject_adapter_in_model(LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), trunk)
    for n, p in trunk.named_parameters(): p.requires_grad_("lora_" in n)
vids = head.vocab_ids
rotary = split.rotary

def inputs(p, e):  # layer-4 hidden of positions [0, e): cached, or through the LoRA'd trunk copy
    if trunk is None:
        return torch.from_numpy(p.hidden[:e]).float()
    x = split.embed(torch.as_tensor(p.tokens[:e], dtype=torch.long)[None])
    pos = torch.arange(e)[None]
    q = torch.arange(e)
    mask = (q[None, :] <= q[:, None])[None, None]
    rope = rotary(x, pos)
    for trunk_layer in trunk.layers:
        x = trunk_layer(x, attention_mask=mask, position_ids=pos, position_embeddings=rope)
    return x[0]

def fwd(h):  # h [T, d] -> logits [T, V]
    x = h[None]
    if layer is not None:
        T = x.shape[1]
        pos = torch.arange(T)[None]
        q = torch.arange(T)
        mask = (q[None, :] <= q[:, None])
        if window: mask &= (q[None, :] > q[:, None] - window)
        x = layer(x, attention_mask=mask[None, None], position_ids=pos, position_embeddings=rotary(x, pos))
        if isinstance(x, tuple): x = x[0]
    return head(x[0])

def to_draft(ids):
    ids = torch.as_tensor(ids, dtype=torch.long)
    idx = torch.searchsorted(vids, ids).clamp_max(len(vids) - 1)
    return idx, vids[idx] == ids

def kl_loss(logits, tids, tlp):
    logq = torch.log_softmax(logits, -1)
    idx, hit = to_draft(tids)
    lp = torch.as_tensor(tlp).masked_fill(~hit, -math.inf)
    p = lp.exp()
    q_in = logq.gather(1, idx)
    rest_p = (1 - p.sum(1)).clamp_min(1e-8)
    mask_in = torch.zeros_like(logq, dtype=torch.bool).scatter_(1, idx, hit)
    q_rest = logq.masked_fill(mask_in, -math.inf).logsumexp(1)
    return -(torch.where(hit, p * q_in, 0).sum(1) + rest_p * q_rest).mean()

def mal(paths, gamma=4):
    rounds = []
    with torch.no_grad():
        for p in paths:
            s, e = p.prompt_len, len(p.tokens) - 1
            if e <= s: continue
            lg = fwd(inputs(p, e))[s:e]
            drafts = vids[lg.argmax(-1)].numpy()
            match = drafts == p.tokens[s + 1:e + 1]
            q = 0
            while q < e - s:
                n = min(gamma, e - s - q - 1)
                a = int(np.argmin(np.append(match[q:q + n], False)))
                rounds.append(a); q += a + 1
    return float(np.mean(rounds) + 1)

def agree(paths):
    hits = tot = 0
    with torch.no_grad():
        for p in paths:
            s, e = p.prompt_len, len(p.tokens) - 1
            lg = fwd(inputs(p, e))[s:e]
            hits += int((vids[lg.argmax(-1)].numpy() == p.tokens[s + 1:e + 1]).sum()); tot += e - s
    return hits / tot

params = [p for p in head.parameters() if p.requires_grad] + ([] if layer is None else list(layer.parameters()))
params += [] if trunk is None else [p for p in trunk.parameters() if p.requires_grad]
print("trainable", sum(p.numel() for p in params), "train positions gen", sum(len(p.tokens) - 1 - p.prompt_len for p in tp),
      "all", sum(len(p.tokens) - 1 for p in tp))
opt = torch.optim.AdamW(params, lr=lr)
print("before", mal(hp), agree(hp))
total = epochs * len(tp); step = 0
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * ((len(tp) + 3) // 4), pct_start=0.05)
t0 = time.time()
for ep in range(epochs):
    order = np.random.RandomState(ep).permutation(len(tp))
    for b in range(0, len(order), 4):
        loss = 0
        for i in order[b:b + 4]:
            p = tp[i]; e = len(p.tokens) - 1
            lo = 0 if use_prompt else p.prompt_len
            lg = fwd(inputs(p, e))[lo:e]
            loss = loss + kl_loss(lg, p.target_topk_ids[lo:e], p.target_topk_logprobs[lo:e])
        opt.zero_grad(); (loss / 4).backward(); opt.step(); sched.step()
    print(f"epoch {ep} {time.time()-t0:.0f}s loss {loss.item()/4:.3f} heldout MAL {mal(hp):.3f} agree {agree(hp):.3f} train-agree {agree(tp[:40]):.3f}", flush=True)
