"""Side-by-side decoding benchmark: what a user has today (Hugging Face generate) against dvi.

All methods run in one process on the same prompts (chat template, batch 1, greedy), interleaved
prompt by prompt with the order rotated, so that machine noise hits every method alike.

At concurrency N (run_concurrency_bench) N requests are in flight on one model instead: N clients, each
sending its next prompt when its last one is answered, to one dvi decoder batching them (selfspec.batching),
or transformers' generate on groups of N prompts at once; hf_ar at batch 1 is the reference for identity.
"""
from __future__ import annotations

import copy
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from dvi.studies.methods import CONCURRENT_DEFAULT, METHODS
from selfspec.acceptance import mean_accepted_length
from selfspec.batching import Batcher
from selfspec.copy_sources import CopySources
from selfspec.passes import StaticPasses, passes_mode
from selfspec.device import dtype_name, synchronize
from selfspec.engine import SelfSpecDecoder
from selfspec.request import DecodeResult
from selfspec.loading import ModelParts, make_length_policy
from selfspec.model import eos_ids
from selfspec.prompts import Prompt, chat_ids, left_padded
from selfspec.suffix_index import SuffixIndex
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


# dvi method -> (length policy, drafts up to the bench's γ (else none: plain decoding), n-gram copies,
# traffic memory: None, "filled" with the answers to the bench's earlier prompts, or "empty")
DVI_METHODS = {
    "dvi_ar": ("fixed", False, 0, None),
    "dvi_spec": ("fixed", True, 0, None),
    "dvi_spec_dynamic": ("cost_aware", True, 0, None),
    # copied n-gram drafts when the text recurs, the head otherwise
    "dvi_spec_ngram": ("fixed", True, 1, None),
    "dvi_spec_ngram_dynamic": ("cost_aware", True, 1, None),
    # ... and copies from a traffic memory of the answers it gave the bench's earlier prompts
    "dvi_memory": ("cost_aware", True, 1, "filled"),
    # ... with a memory that stays empty: what consulting a memory costs when it never has anything to offer
    "dvi_memory_empty": ("cost_aware", True, 1, "empty"),
}


def make_decoder(parts: ModelParts, method: str, gamma: int, batch_sizes: tuple[int, ...] = (1,)) -> SelfSpecDecoder:
    """The decoder of a dvi method; a cost-aware one times the passes at `batch_sizes`, the batches it will run."""
    policy, drafts, ngram, memory = DVI_METHODS[method]
    gamma = gamma if drafts else 0
    length_policy = make_length_policy(policy, gamma, parts.passes, parts.head, batch_sizes)
    memory = SuffixIndex() if memory else None
    return SelfSpecDecoder(parts.split, parts.head, length_policy, CopySources(ngram, memory), passes=parts.passes)


def _hf_runner(model, max_new_tokens: int, **assist):
    config = copy.deepcopy(model.generation_config)
    config.update(max_new_tokens=max_new_tokens, do_sample=False, **assist)
    device = model.device

    def run(ids: list[int]):
        input_ids = torch.tensor([ids], device=device)
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
        return out[0, len(ids):].tolist(), None
    return run


def _dvi_runner(decoder: SelfSpecDecoder, max_new_tokens: int, fill_memory: bool = False):
    memory = decoder.copies.memory if fill_memory else None

    def run(ids: list[int]):
        result = decoder.generate(ids, max_new_tokens=max_new_tokens)
        if memory is not None:  # served: the next prompts may draft from it
            memory.insert(result.tokens)
        return result.tokens, result
    return run


def make_runners(parts: ModelParts, max_new_tokens: int, gamma: int, methods: tuple[str, ...] = METHODS,
                 prompt_lookup_tokens: int = 10) -> dict[str, Callable[[list[int]], tuple[list[int], DecodeResult | None]]]:
    """One runner per method, hf_ar first (the reference for speedup and identity): ids -> (new tokens, result)."""
    model, split = parts.model, parts.split
    makers = {
        "hf_ar": lambda: _hf_runner(model, max_new_tokens),
        "hf_prompt_lookup": lambda: _hf_runner(model, max_new_tokens, prompt_lookup_num_tokens=prompt_lookup_tokens),
        "hf_early_exit": lambda: _hf_runner(model, max_new_tokens, assistant_early_exit=split.exit_layer),
        # transformers' preallocated ("static") KV cache, uncompiled: what torch.compile would build on
        "hf_static": lambda: _hf_runner(model, max_new_tokens, cache_implementation="static", disable_compile=True),
        # the same as transformers runs it out of the box: on CUDA it compiles the forward (recompiling for
        # every new cache length, i.e. per prompt length); elsewhere it is hf_static
        "hf_compile": lambda: _hf_runner(model, max_new_tokens, cache_implementation="static"),
        # built only when asked for: cost_aware measures costs at start-up
        **{name: (lambda name=name: _dvi_runner(make_decoder(parts, name, gamma), max_new_tokens,
                                                DVI_METHODS[name][3] == "filled"))
           for name in DVI_METHODS},
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


def size_static_cache(parts: ModelParts, prompts_ids: list[list[int]], max_new_tokens: int, gamma: int,
                      slots: int = 1) -> None:
    """Grow a static KV cache (selfspec.passes) to fit the longest prompt, `slots` sequences at once, before
    anything is timed or measured: growing it later drops every captured CUDA graph, and recapturing them
    would land inside a timed generation."""
    if isinstance(parts.passes, StaticPasses):
        # what the decoder asks for: a round's widest block (γ + 1) and a padding row's position after it
        parts.passes.new_cache(max(map(len, prompts_ids)) + max_new_tokens + gamma + 2, slots)


def run_bench(parts: ModelParts, prompts: list[Prompt], max_new_tokens: int, gamma: int,
              methods: tuple[str, ...] = METHODS, prompt_lookup_tokens: int = 10) -> dict:
    encoded = [chat_ids(parts.tokenizer, p.text) for p in prompts]
    size_static_cache(parts, encoded, max_new_tokens, gamma)  # before make_runners: cost-aware ones capture
    runners = make_runners(parts, max_new_tokens, gamma, methods, prompt_lookup_tokens)
    runs = run_interleaved(runners, encoded, parts.split.device)
    return bench_report(parts, prompts, encoded, runs, max_new_tokens, gamma)


def run_interleaved(runners: dict, encoded: list[list[int]], device: torch.device) -> dict[str, MethodRuns]:
    """Every runner on every prompt, one at a time (run_prompt), after an untimed warm-up."""
    names = list(runners)
    warm_up(runners, encoded[0])
    runs = {name: MethodRuns(name) for name in names}
    with tqdm(total=len(encoded) * len(names), desc="bench", unit="gen") as bar:
        for i, ids in enumerate(encoded):
            run_prompt(runners, runs, ids, i, bar, device)
            bar.update(len(names))
    return runs


def bench_report(parts: ModelParts, prompts: list[Prompt], encoded: list[list[int]], runs: dict[str, MethodRuns],
                 max_new_tokens: int, gamma: int) -> dict:
    """The JSON report of batch-1 runs: the machine, the settings, and each method against hf_ar."""
    model, split = parts.model, parts.split
    reference = runs["hf_ar"]
    report = {
        "model": parts.meta.get("base_model", getattr(model.config, "_name_or_path", "")) or "unknown",
        **machine_info(parts),
        "max_new_tokens": max_new_tokens, "n_prompts": len(prompts), "exit_layer": split.exit_layer,
        "gamma": gamma, "head_path": parts.meta.get("path"),
        "prompts": [{"id": p.id, "category": p.category} for p in prompts],
        "methods": [method_summary(runs[name], reference, model, encoded) for name in runs],
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


# `dvi bench --concurrency`: N requests in flight on one model.

# per untimed warm-up request: a few rounds at the level's batch size, so that first calls' allocations and
# kernel choices fall outside the timed set
WARM_UP_TOKENS = 16


@dataclass(frozen=True)
class Concurrency:
    """What `dvi bench --concurrency` runs: every method of `methods` with N requests in flight, for every N
    of `levels`."""
    levels: tuple[int, ...]
    methods: tuple[str, ...] = CONCURRENT_DEFAULT
    repeat: int = 1  # every level this many times, methods interleaved; a cell reports the median run


@dataclass
class Request:
    """One request as its client saw it."""
    tokens: list[int]
    ttft: float  # seconds from sending it to its first token
    latency: float  # seconds from sending it to its last token
    result: DecodeResult | None = None  # dvi methods only


@dataclass
class LevelRun:
    """A method's requests at one level, in prompt order, and the wall time of the whole set."""
    requests: list[Request]
    seconds: float
    mean_batch_size: float | None = None  # dvi methods: sequences per decoder round


def run_concurrency_bench(parts: ModelParts, prompts: list[Prompt], max_new_tokens: int, gamma: int,
                          concurrency: Concurrency) -> dict:
    """hf_ar alone at batch 1 on every prompt (the reference: report["methods"]), then every method of
    `concurrency` at each of its levels (report["by_concurrency"]["N"][method])."""
    encoded = [chat_ids(parts.tokenizer, p.text) for p in prompts]
    # before any decoder is built (cost-aware ones capture), with a slot for every sequence of the largest batch
    size_static_cache(parts, encoded, max_new_tokens, gamma, max(concurrency.levels))
    runs = run_interleaved(make_runners(parts, max_new_tokens, gamma, ("hf_ar",)), encoded, parts.split.device)
    report = bench_report(parts, prompts, encoded, runs, max_new_tokens, gamma)
    servers = {name: _hf_batched_runner(parts.model) if name == "hf_batched" else
               _batcher_runner(make_decoder(parts, name, gamma, concurrency.levels)) for name in concurrency.methods}
    levels = run_levels(servers, encoded, concurrency, max_new_tokens, parts.split.device)
    reference = runs["hf_ar"].tokens
    report["repeat"] = concurrency.repeat
    report["by_concurrency"] = {str(n): {name: level_summary(levels[n][name], reference) for name in servers}
                                for n in concurrency.levels}
    return report


def run_levels(servers: dict, encoded: list[list[int]], concurrency: Concurrency, max_new_tokens: int,
               device: torch.device) -> dict[int, dict[str, list[LevelRun]]]:
    """Every server (method) on every prompt at every level, `repeat` times, each run after an untimed
    warm-up at its level. The method order rotates with the level and the repetition, so that no method
    always runs first (or right after the same one) while the machine's speed drifts."""
    names, levels = list(servers), concurrency.levels
    out: dict[int, dict[str, list[LevelRun]]] = {n: {name: [] for name in names} for n in levels}
    total = concurrency.repeat * len(levels) * len(names) * len(encoded)
    with tqdm(total=total, desc="bench --concurrency", unit="req") as bar:
        for r in range(concurrency.repeat):
            for j, level in enumerate(levels):
                turn = (j + r) % len(names)
                for name in names[turn:] + names[:turn]:
                    bar.set_postfix_str(f"{name}, {level} in flight, run {r + 1}/{concurrency.repeat}")
                    servers[name]([ids[:16] for ids in encoded[:level]], level, WARM_UP_TOKENS, lambda n: None)
                    synchronize(device)
                    out[level][name].append(servers[name](encoded, level, max_new_tokens, bar.update))
    return out


def level_summary(runs: list[LevelRun], reference: list[list[int]]) -> dict:
    """A method's numbers at one level, from the run of median throughput (`tokens_per_s_runs` holds every
    run's); `reference`: hf_ar's batch-1 tokens, prompt by prompt. Every run's outputs count for
    identical_to_ar."""
    rates = [sum(len(r.tokens) for r in run.requests) / run.seconds for run in runs]
    run = runs[sorted(range(len(runs)), key=rates.__getitem__)[(len(runs) - 1) // 2]]  # the lower median
    requests, tokens = run.requests, [r.tokens for r in run.requests]
    out = {"tokens_per_s": sum(map(len, tokens)) / run.seconds, "tokens_per_s_runs": rates,
           "tokens_per_s_per_request": float(np.mean([len(r.tokens) / r.latency for r in requests])),
           "ttft_p50_s": float(np.median([r.ttft for r in requests])),
           "latency_p50_s": float(np.median([r.latency for r in requests])),
           "identical_to_ar": float(np.mean([_identical([r.tokens for r in other.requests], reference)
                                             for other in runs])),
           "tokens": int(sum(map(len, tokens))), "seconds": run.seconds}
    if all(r.result is not None for r in requests):
        out["mean_batch_size"] = run.mean_batch_size
        out["mean_accepted_length"] = mean_accepted_length(s.accepted for r in requests for s in r.result.rounds)
    return out


class _FirstCall(LogitsProcessor):
    """Notes when generate first processes logits: the prefill is done and the first token one argmax away."""

    def __init__(self, device: torch.device):
        self.device, self.at = device, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at is None:
            synchronize(self.device)  # on a GPU the prefill may still be queued
            self.at = time.perf_counter()
        return scores


def _hf_batched_runner(model):
    """transformers' generate on consecutive groups of N prompts, left-padded: a group's requests are all
    sent at its start and all answered at its end (generate returns nothing earlier), so their latency is
    the group's wall time, and their TTFT the time to the group's first token."""
    eos = eos_ids(model.generation_config)
    pad = min(eos, default=0)  # any id: padded positions are masked, and a row's tokens after EOS cut off
    device = model.device

    def group(prompts: list[list[int]], max_new_tokens: int) -> list[Request]:
        config = copy.deepcopy(model.generation_config)
        config.update(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        input_ids, mask = left_padded(prompts, pad)
        first = _FirstCall(device)
        synchronize(device)
        start = time.perf_counter()
        out = model.generate(input_ids.to(device), attention_mask=mask.to(device), generation_config=config,
                             logits_processor=LogitsProcessorList([first]))
        synchronize(device)
        seconds = time.perf_counter() - start
        rows = [_until_eos(row, eos) for row in out[:, input_ids.shape[1]:].tolist()]
        return [Request(row, first.at - start, seconds) for row in rows]

    def run(prompts: list[list[int]], level: int, max_new_tokens: int, done: Callable[[int], None]) -> LevelRun:
        start, requests = time.perf_counter(), []
        for i in range(0, len(prompts), level):
            requests += group(prompts[i:i + level], max_new_tokens)
            done(len(prompts[i:i + level]))
        return LevelRun(requests, time.perf_counter() - start)
    return run


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """A batched row as batch 1 would have returned it: up to its first EOS (what follows is padding)."""
    return tokens[:next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))]


def _batcher_runner(decoder: SelfSpecDecoder):
    """The decoder serving N clients with continuous batching (selfspec.batching), each client sending its next
    prompt as soon as its last one is answered (a closed loop): a request's TTFT and latency are what its
    client waits for it, never time queued behind prompts a real client would not have sent yet. The batch
    loop runs on this thread, the one that ran the model so far (why: selfspec.batching)."""
    def run(prompts: list[list[int]], level: int, max_new_tokens: int, done: Callable[[int], None]) -> LevelRun:
        batcher = Batcher(decoder, level, own_thread=False)

        def clients() -> list[Request]:
            try:
                with ThreadPoolExecutor(level) as pool:  # a free client takes the next prompt, in order
                    requests = []
                    for request in pool.map(lambda ids: _request(batcher, ids, max_new_tokens), prompts):
                        requests.append(request)
                        done(1)
                    return requests
            finally:
                batcher.close()

        start = time.perf_counter()
        with ThreadPoolExecutor(1) as sender:
            sent = sender.submit(clients)
            batcher.run()
            requests = sent.result()
        return LevelRun(requests, time.perf_counter() - start, batcher.mean_batch_size)
    return run


def _request(batcher: Batcher, ids: list[int], max_new_tokens: int) -> Request:
    """One client's request: sent, its chunks read as they come, its result."""
    handle = batcher.submit(ids, max_new_tokens=max_new_tokens)
    first = None
    for _ in handle:
        first = first if first is not None else time.perf_counter()
    result = handle.wait()
    return Request(result.tokens, first - handle.submitted, time.perf_counter() - handle.submitted, result)
