"""Side-by-side decoding benchmark: what a user has today (Hugging Face generate) against dvi.

All methods run in one process on the same prompts (chat template, batch 1, greedy), interleaved
prompt by prompt with the order rotated, so that machine noise hits every method alike.
"""
from __future__ import annotations

import copy
import platform
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from dvi.studies.methods import METHODS
from selfspec.acceptance import mean_accepted_length
from selfspec.passes import StaticPasses, passes_mode
from selfspec.device import dtype_name, synchronize
from selfspec.engine import DecodeResult, SelfSpecDecoder
from selfspec.loading import ModelParts, make_length_policy
from selfspec.prompts import Prompt, chat_ids
from selfspec.versions import cpu_name, package_versions


@dataclass
class MethodRuns:
    name: str
    tokens: list[list[int]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    results: list[DecodeResult] = field(default_factory=list)  # dvi methods only

    @property
    def tokens_per_s(self) -> float:
        """All its new tokens over all its seconds."""
        return sum(map(len, self.tokens)) / sum(self.seconds)

    def subset(self, keep: list[int]) -> "MethodRuns":
        """The runs of prompts number `keep`, in that order."""
        return MethodRuns(self.name, [self.tokens[i] for i in keep], [self.seconds[i] for i in keep],
                          [self.results[i] for i in keep] if self.results else [])


def _hf_runner(model, max_new_tokens: int, **assist):
    config = copy.deepcopy(model.generation_config)
    config.update(max_new_tokens=max_new_tokens, do_sample=False, **assist)
    device = model.device

    def run(ids: list[int]):
        input_ids = torch.tensor([ids], device=device)
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
        return out[0, len(ids):].tolist(), None
    return run


def _dvi_runner(decoder: SelfSpecDecoder, max_new_tokens: int):
    def run(ids: list[int]):
        result = decoder.generate(ids, max_new_tokens=max_new_tokens)
        return result.tokens, result
    return run


def make_runners(parts: ModelParts, max_new_tokens: int, gamma: int, methods: tuple[str, ...] = METHODS,
                 prompt_lookup_tokens: int = 10) -> dict[str, Callable[[list[int]], tuple[list[int], DecodeResult | None]]]:
    """One runner per method, hf_ar first (the reference for speedup and identity): ids -> (new tokens, result)."""
    model, split, head, passes = parts.model, parts.split, parts.head, parts.passes

    def dvi(name: str, gamma: int, ngram: int = 0):  # built only when asked for: cost_aware measures costs at start-up
        policy = make_length_policy(name, gamma, passes, head)
        return _dvi_runner(SelfSpecDecoder(split, head, policy, ngram=ngram, passes=passes), max_new_tokens)

    makers = {
        "hf_ar": lambda: _hf_runner(model, max_new_tokens),
        "hf_prompt_lookup": lambda: _hf_runner(model, max_new_tokens, prompt_lookup_num_tokens=prompt_lookup_tokens),
        "hf_early_exit": lambda: _hf_runner(model, max_new_tokens, assistant_early_exit=split.exit_layer),
        # transformers' preallocated ("static") KV cache, uncompiled: what torch.compile would build on
        "hf_static": lambda: _hf_runner(model, max_new_tokens, cache_implementation="static", disable_compile=True),
        # the same as transformers runs it out of the box: on CUDA it compiles the forward (recompiling for
        # every new cache length, i.e. per prompt length); elsewhere it is hf_static
        "hf_compile": lambda: _hf_runner(model, max_new_tokens, cache_implementation="static"),
        "dvi_ar": lambda: dvi("fixed", 0),
        "dvi_spec": lambda: dvi("fixed", gamma),
        "dvi_spec_dynamic": lambda: dvi("cost_aware", gamma),
        # copied n-gram drafts when the text recurs, the head otherwise
        "dvi_spec_ngram": lambda: dvi("fixed", gamma, ngram=1),
        "dvi_spec_ngram_dynamic": lambda: dvi("cost_aware", gamma, ngram=1),
    }
    names = ["hf_ar"] + [m for m in methods if m != "hf_ar"]
    return {name: makers[name]() for name in names}


def warm_up(runners: dict, ids: list[int]) -> None:
    """First calls allocate buffers and pick kernels: one short call per method, not timed."""
    for run in runners.values():
        run(ids[:16])


def run_prompt(runners: dict, runs: dict[str, MethodRuns], ids: list[int], i: int, bar: tqdm | None = None,
               device: torch.device | None = None) -> dict[str, list[int]]:
    """Every method on prompt number i, the order rotated by i so that machine noise hits every method
    alike; each run is appended to runs[name]. Returns each method's new tokens. On a GPU `device`, its
    queued work is waited for before each clock reading (nothing is done on the CPU)."""
    names = list(runners)
    out = {}
    for name in names[i % len(names):] + names[: i % len(names)]:
        synchronize(device)
        start = time.perf_counter()
        tokens, result = runners[name](ids)
        synchronize(device)
        runs[name].seconds.append(time.perf_counter() - start)
        runs[name].tokens.append(tokens)
        if result is not None:
            runs[name].results.append(result)
        out[name] = tokens
        if bar is not None:
            bar.set_postfix_str(f"{name} {len(tokens) / runs[name].seconds[-1]:.1f} tok/s")
    return out


def machine_info(parts: ModelParts) -> dict:
    """Where the run happened: device, dtype and why, the machine, (CPU) the few-row kernel measured on it, and
    the package versions (selfspec.versions)."""
    split = parts.split
    cpu = split.device.type == "cpu"
    machine = f"{platform.machine()} {torch.get_num_threads()} threads" if cpu else torch.cuda.get_device_name(split.device)
    graphs_off = getattr(parts.passes, "fallback", None)
    return {"device": str(split.device), "dtype": dtype_name(split.dtype), "dtype_reason": parts.dtype_reason,
            "passes": passes_mode(parts.passes), **({"passes_fallback": graphs_off} if graphs_off else {}),
            "machine": machine, "cpu": cpu_name(), "thin_gemm_rows": sorted(split.thin_rows) if cpu else [],
            "versions": package_versions()}  # what hf_ar's and dvi's speeds were measured with


def size_static_cache(parts: ModelParts, prompts_ids: list[list[int]], max_new_tokens: int, gamma: int) -> None:
    """Grow a static KV cache (selfspec.passes) to fit the longest prompt before anything is timed or
    measured: growing it later drops every captured CUDA graph, and recapturing them would land inside a
    timed generation."""
    if isinstance(parts.passes, StaticPasses):
        parts.passes.new_cache(max(map(len, prompts_ids)) + max_new_tokens + gamma + 1)


def run_bench(parts: ModelParts, prompts: list[Prompt], max_new_tokens: int, gamma: int,
              methods: tuple[str, ...] = METHODS, prompt_lookup_tokens: int = 10) -> dict:
    model, split = parts.model, parts.split
    encoded = [chat_ids(parts.tokenizer, p.text) for p in prompts]
    size_static_cache(parts, encoded, max_new_tokens, gamma)  # before make_runners: cost-aware ones capture
    runners = make_runners(parts, max_new_tokens, gamma, methods, prompt_lookup_tokens)
    names = list(runners)
    warm_up(runners, encoded[0])
    runs = {name: MethodRuns(name) for name in names}
    with tqdm(total=len(prompts) * len(names), desc="bench", unit="gen") as bar:
        for i, ids in enumerate(encoded):
            run_prompt(runners, runs, ids, i, bar, split.device)
            bar.update(len(names))
    reference = runs["hf_ar"]
    report = {
        "model": parts.meta.get("base_model", getattr(model.config, "_name_or_path", "")) or "unknown",
        **machine_info(parts),
        "max_new_tokens": max_new_tokens, "n_prompts": len(prompts), "exit_layer": split.exit_layer,
        "gamma": gamma, "head_path": parts.meta.get("path"),
        "prompts": [{"id": p.id, "category": p.category} for p in prompts],
        "methods": [method_summary(runs[name], reference, model, encoded) for name in names],
    }
    if "dvi_ar" in runs:  # does drafting itself ever change a token? (in bfloat16 hf_ar and dvi_ar may differ)
        for m in report["methods"]:
            if m["name"].startswith("dvi_spec"):
                got, own = runs[m["name"]].tokens, runs["dvi_ar"].tokens
                m["identical_to_dvi_ar"] = _identical(got, own)
                m["divergences_from_dvi_ar"] = _divergences(model, encoded, own, got)
    return report


def method_summary(runs: MethodRuns, reference: MethodRuns, model=None, encoded=None) -> dict:
    """A method's totals against the reference's (hf_ar's); with `model` (and the prompts' ids), where each
    output that differs from the reference first departs from it."""
    tps = runs.tokens_per_s
    out = {"name": runs.name, "tokens_per_s": tps, "speedup": tps / reference.tokens_per_s,
           "tokens": int(sum(map(len, runs.tokens))), "seconds": float(sum(runs.seconds)),
           "identical_to_ar": _identical(runs.tokens, reference.tokens),
           "mean_accepted_length": 1.0 if runs.name == "hf_ar" else None,
           "acceptance_rate": None, "per_position_acceptance": None}
    if runs.results:
        rounds = [r for res in runs.results for r in res.rounds]
        drafted = sum(r.drafted for r in rounds)
        longest = max((r.drafted for r in rounds), default=0)
        reached = np.array([sum(r.drafted > i for r in rounds) for i in range(longest)])
        accepted = np.array([sum(r.accepted > i for r in rounds) for i in range(longest)])
        total = sum(res.t_total for res in runs.results)
        out.update(
            mean_accepted_length=mean_accepted_length(r.accepted for r in rounds),
            acceptance_rate=(sum(r.accepted for r in rounds) / drafted) if drafted else None,
            per_position_acceptance=(accepted / np.maximum(reached, 1)).round(4).tolist(),
            rounds=len(rounds), drafted=drafted, mean_drafted=drafted / max(len(rounds), 1),
            time_split={"prefill": sum(res.t_prefill for res in runs.results) / total,
                        "draft": sum(r.t_draft for r in rounds) / total,
                        "verify": sum(r.t_verify for r in rounds) / total})
        if model is not None:
            out["divergences"] = _divergences(model, encoded, reference.tokens, runs.tokens)
    return out


def _identical(outputs: list[list[int]], references: list[list[int]]) -> float:
    """The fraction of outputs token-identical to their reference."""
    return float(np.mean([a == b for a, b in zip(outputs, references)]))


def _divergences(model, encoded: list[list[int]], references: list[list[int]], outputs: list[list[int]]) -> list[dict]:
    """For every output that differs from its reference: where it departs and the model's margin there."""
    return [_divergence(model, encoded[i], ref, got) for i, (ref, got) in enumerate(zip(references, outputs)) if ref != got]


@torch.inference_mode()
def _divergence(model, prompt: list[int], ref: list[int], got: list[int]) -> dict:
    """Where an output first departs from its reference's, and the full model's top-2 logit margin there."""
    i = next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    logits = model(torch.tensor([prompt + ref[:i]], device=model.device)).logits[0, -1].float()
    top = logits.topk(2).values
    return {"index": i, "ref_token": ref[i] if i < len(ref) else None, "got_token": got[i] if i < len(got) else None,
            "logit_margin": float(top[0] - top[1])}
