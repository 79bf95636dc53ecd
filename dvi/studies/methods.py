"""The decoding methods `dvi bench`, `dvi eval` and `dvi profile` compare, by name (dvi/studies/bench.py
builds them). Names only, no torch: the commands' parsers list them and `dvi --help` must not load torch."""
from __future__ import annotations

METHODS = ("hf_ar", "hf_prompt_lookup", "hf_early_exit", "dvi_ar", "dvi_spec", "dvi_spec_dynamic", "dvi_spec_ngram",
           "dvi_spec_ngram_dynamic")
# Only when named in --methods: generate with transformers' preallocated ("static") KV cache, uncompiled
# (hf_static) and as transformers runs it by default, compiled on CUDA (hf_compile); dvi_spec_ngram_dynamic
# with a traffic memory of the answers to the bench's earlier prompts (dvi_memory), or with one that stays
# empty (dvi_memory_empty: the memory's cost when it has nothing to offer).
EXTRA_METHODS = ("hf_static", "hf_compile", "dvi_memory", "dvi_memory_empty")
# `dvi bench --concurrency`: N requests in flight on one model. hf_batched is transformers' generate on N
# left-padded prompts at once; the dvi methods serve them through one decoder with continuous batching.
CONCURRENT_METHODS = ("hf_batched", "dvi_ar", "dvi_spec", "dvi_spec_dynamic", "dvi_spec_ngram",
                      "dvi_spec_ngram_dynamic")
# Fixed γ against the batch-aware cost-aware policy with the same drafting sources (copies, then the head),
# so that the only difference between the two is how much each round drafts.
CONCURRENT_DEFAULT = ("hf_batched", "dvi_ar", "dvi_spec_ngram", "dvi_spec_ngram_dynamic")


def parse_methods(text: str, choices: tuple[str, ...] = METHODS + EXTRA_METHODS) -> tuple[str, ...]:
    """--methods: comma-separated names of `choices`, in the order given."""
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = set(methods) - set(choices)
    if unknown:
        raise ValueError(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(choices)}")
    return methods
