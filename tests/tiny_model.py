"""A tiny random Llama for exactness tests: float64, later layers damped so early exit is close to
(but not the same as) the full model, which makes drafts accepted and rejected at every position."""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from selfspec.config import HeadConfig
from selfspec.drafter import DrafterHead
from selfspec.length_policy import Calibration, ConfidenceThreshold, CostAware, LengthPolicy
from selfspec.split import SplitModel
from selfspec.pass_costs import PassCosts


def tiny_llama(seed: int = 0, vocab: int = 256, layers: int = 4, max_positions: int = 96,
               damp: float = 0.3, init: float = 0.3) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      tie_word_embeddings=True, initializer_range=init, eos_token_id=None, bos_token_id=None,
                      pad_token_id=None)
    model = LlamaForCausalLM(cfg).double().eval().requires_grad_(False)
    with torch.no_grad():
        for layer in model.model.layers[layers // 2:]:
            layer.self_attn.o_proj.weight.mul_(damp)
            layer.mlp.down_proj.weight.mul_(damp)
    return model


@torch.no_grad()
def plain_greedy(model, prompt: list[int], max_new_tokens: int, eos: set[int] = frozenset(),
                 max_positions: int | None = None) -> list[int]:
    """Reference: a full forward over the whole sequence for every token, no cache, no drafting (on the
    model's device)."""
    ids = list(prompt)
    limit = max_positions or model.config.max_position_embeddings
    while len(ids) - len(prompt) < max_new_tokens and len(ids) < limit:
        ids.append(int(model(torch.tensor([ids], device=model.device)).logits[0, -1].argmax()))
        if ids[-1] in eos:
            break
    return ids[len(prompt):]


@torch.no_grad()
def plain_greedy_batch(model, prompts: list[list[int]], max_new_tokens: int | list[int],
                       max_positions: int | None = None) -> list[list[int]]:
    """plain_greedy (no EOS) of many prompts at once, the same tokens at a fraction of the cost: the prompts
    left-padded (masked, positions counted from each prompt's own start) and decoded together, one
    KV-cached forward of the plain HF model per new token. `max_new_tokens`: one count for all, or one per
    prompt. test_lossless checks it against plain_greedy."""
    counts = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    limit = max_positions or model.config.max_position_embeddings
    counts = [max(0, min(n, limit - len(p))) for p, n in zip(prompts, counts, strict=True)]
    if not prompts or max(counts) == 0:
        return [[] for _ in prompts]
    width, dev = max(map(len, prompts)), model.device
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=dev)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long, device=dev)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # transformers 5.x renames `past_key_values` to `cache` (the old name warns)
    cache_kw = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    cache, new = DynamicCache(), []
    for _ in range(max(counts)):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{cache_kw: cache}).logits
        ids = logits[:, -1].argmax(-1, keepdim=True)
        new.append(ids)
        mask = torch.cat([mask, torch.ones_like(ids)], 1)
        positions = positions[:, -1:] + 1
    return [row[:n] for row, n in zip(torch.cat(new, 1).tolist(), counts)]


def byte_tokenizer():
    """A byte-level BPE without merges (256 ids, one per byte) and a tag chat template, loadable by AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    template = ("{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<a>{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template)


def save_tiny_model(path, seed: int = 3, max_positions: int = 256):
    """A tiny Llama (float64 weights) with the byte tokenizer saved as a model directory that
    `--model PATH` loads; returns the path."""
    tiny_llama(seed=seed, max_positions=max_positions).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def write_prompts(path, texts: list[str]):
    """A Spec-Bench-format JSONL of one-turn questions (what `--prompts PATH` reads); returns the path."""
    import json

    path.write_text("".join(json.dumps({"question_id": i, "category": "tiny", "turns": [t]}) + "\n"
                            for i, t in enumerate(texts)))
    return path


# Heads and length policies on the tiny model, for the lossless tests on the CPU and on CUDA.
MAX_POS = 96  # the lossless tests' tiny model context


def make_head(model, k, noise, draft_vocab=None, seed=0, attention=None):
    layers, window = attention or (0, 0)
    head = DrafterHead(SplitModel(model, k), HeadConfig(adapter_hidden=32, lora_rank=4,
                                                         draft_vocab=draft_vocab, attention_layers=layers,
                                                         context_window=window))
    gen = torch.Generator().manual_seed(seed)  # on the CPU whatever the model's device: the same head everywhere
    with torch.no_grad():  # perturb so that the head is sometimes right, sometimes wrong
        head.proj.lora_B.default.weight.copy_(torch.randn(head.proj.lora_B.default.weight.shape, generator=gen,
                                                          dtype=torch.float64) * noise)
        for p in head.layers.parameters():
            p.add_((torch.randn(p.shape, generator=gen, dtype=p.dtype) * noise).to(p.device))
    return head


def make_length_policy(kind, gamma):
    if kind == "fixed":
        return LengthPolicy(gamma)
    if kind == "threshold":
        return ConfidenceThreshold(gamma, min_top_prob=0.2, max_entropy=4.0)
    # Made-up costs where drafting pays, so the cost-aware policy really drafts (and varies lengths); the
    # cost model alone (no measured round times), so what a test covers never depends on how fast it ran.
    return CostAware(PassCosts(trunk=0.1, head=0.02, verify=[0, 1.0] + [1.05] * gamma), gamma,
                     Calibration(explore=0.2, measured=False))
