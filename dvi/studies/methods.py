"""The decoding methods `dvi bench`, `dvi eval` and `dvi profile` compare, by name (dvi/studies/bench.py
builds them). Names only, no torch: the commands' parsers list them and `dvi --help` must not load torch."""
from __future__ import annotations

METHODS = ("hf_ar", "hf_prompt_lookup", "hf_early_exit", "dvi_ar", "dvi_spec", "dvi_spec_dynamic", "dvi_spec_ngram",
           "dvi_spec_ngram_dynamic")
# Only when named in --methods: generate with transformers' preallocated ("static") KV cache, uncompiled
# (hf_static) and as transformers runs it by default, compiled on CUDA (hf_compile).
EXTRA_METHODS = ("hf_static", "hf_compile")


def parse_methods(text: str) -> tuple[str, ...]:
    """--methods: comma-separated names of METHODS and EXTRA_METHODS, in the order given."""
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = set(methods) - set(METHODS) - set(EXTRA_METHODS)
    if unknown:
        raise ValueError(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS + EXTRA_METHODS)}")
    return methods
