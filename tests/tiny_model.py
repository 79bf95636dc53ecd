"""A tiny random Llama for exactness tests: float64, later layers damped so early exit is close to
(but not the same as) the full model, which makes drafts accepted and rejected at every position."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

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
    # Made-up costs where drafting pays, so the cost-aware policy really drafts (and varies lengths).
    return CostAware(PassCosts(trunk=0.1, head=0.02, verify=[0, 1.0] + [1.05] * gamma), gamma, Calibration(explore=0.2))
