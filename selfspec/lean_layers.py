"""Llama decoder layers run as plain tensor code, for the few-token passes of decoding.

A decoding pass through SmolLM2 is ~210 small matrix products. Around them, the Hugging Face
layer's module calls, keyword plumbing and attention dispatch cost a measurable share of a pass of 1-8
tokens on a CPU (docs/results/experiments/fused_layers.py measures it).
`LeanLlamaLayer` computes what `LlamaDecoderLayer.forward` computes, in the same order with the same
kernels (HF's own RMSNorm and rotary code, the split's few-row product, SDPA with the same grouped-query
layout), on the same shared weights, without that machinery. Layers it does not reproduce exactly
(biases, other activations, other architectures) keep their own forward: see `lean_layers`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from selfspec.small_batch_linear import small_batch_linear


def lean_layers(layers, config, thin_rows) -> list["LeanLlamaLayer"] | None:
    """Lean versions of `layers`, or None when any of them is not a plain Llama layer. `thin_rows`: the
    split's measured kernel choice (selfspec/small_batch_linear.py), shared, not copied."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

    plain = (getattr(config, "hidden_act", None) == "silu" and not getattr(config, "attention_bias", False)
             and not getattr(config, "mlp_bias", False) and getattr(config, "pretraining_tp", 1) == 1)
    if not plain or not all(type(layer) is LlamaDecoderLayer and type(layer.input_layernorm) is LlamaRMSNorm
                            for layer in layers):
        return None
    return [LeanLlamaLayer(layer, thin_rows) for layer in layers]


class LeanLlamaLayer:
    def __init__(self, layer, thin_rows):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn, mlp = layer.self_attn, layer.mlp
        self.index, self.head_dim = attn.layer_idx, attn.head_dim
        self.groups, self.scale = attn.num_key_value_groups, attn.scaling
        self.q, self.k, self.v, self.o = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                                          attn.o_proj.weight)
        self.gate, self.up, self.down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        # .forward: HF's exact arithmetic (float32 statistics, rotate-half) without the module call
        self.norm_attn, self.norm_mlp = layer.input_layernorm.forward, layer.post_attention_layernorm.forward
        self.rope = apply_rotary_pos_emb
        self.thin_rows = thin_rows  # shared with the split, which measures it

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return small_batch_linear(x, weight, thin_rows=self.thin_rows)

    def __call__(self, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                 cache) -> torch.Tensor:
        """hidden [1, n, d] at the positions `rope` was computed for; appends n positions to the cache."""
        b, n, _ = hidden.shape
        x = self.norm_attn(hidden)
        q = self._linear(x, self.q).view(b, n, -1, self.head_dim).transpose(1, 2)
        k = self._linear(x, self.k).view(b, n, -1, self.head_dim).transpose(1, 2)
        v = self._linear(x, self.v).view(b, n, -1, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, k, *rope)
        keys, values = cache.update(k, v, self.index)
        hidden = hidden + self._linear(self._attention(q, keys, values, mask), self.o)
        x = self.norm_mlp(hidden)
        return hidden + self._linear(F.silu(self._linear(x, self.gate)) * self._linear(x, self.up), self.down)

    def _attention(self, q, keys, values, mask):
        """[B, heads, n, dim] queries over the cache -> [B, n, heads * dim]. Each key/value head serves its
        group's queries at once: the group's n queries become one axis of groups * n (the mask repeated per
        group), so the cache is read as it is. Expanding keys and values to every query head instead copies
        the whole cache per layer, which made a 2-token block over a 700-token context 4x a 1-token one."""
        b, heads, n, dim = q.shape
        if self.groups == 1:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
            return out.transpose(1, 2).reshape(b, n, heads * dim)
        grouped = q.reshape(b, heads // self.groups, self.groups * n, dim)
        if mask is not None and n > 1:
            mask = mask[:, :, None].expand(-1, -1, self.groups, -1, -1).reshape(mask.shape[0], 1, self.groups * n, -1)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=self.scale)
        return out.view(b, heads, n, dim).transpose(1, 2).reshape(b, n, heads * dim)
