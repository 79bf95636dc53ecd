"""Where a decoding method's time goes, per generated token (torch.profiler): `dvi profile`.

For each method, one prompt is decoded once unprofiled (warm-up, graph capture) and once under
torch.profiler. Per token: the wall time, the CPU time spent in torch operators, and on CUDA the kernel
time, the kernel count and the fraction of the wall time the GPU was busy. Writes a per-method operator
table (<method>.txt) and, with `trace`, a Chrome trace per method into the output directory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from dvi.studies.bench import machine_info, make_runners, size_static_cache
from selfspec.loading import ModelParts
from selfspec.prompts import Prompt, chat_ids


@dataclass(frozen=True)
class ProfileSpec:
    """What `dvi profile` measures and where it writes (traces, profile.json)."""
    methods: tuple[str, ...]
    max_new_tokens: int
    gamma: int
    out: Path
    trace: bool = False  # also Chrome traces per method
    model: str | None = None  # as the report names it


def run_profile(parts: ModelParts, prompt: Prompt, spec: ProfileSpec) -> dict:
    """Profile each method on `prompt`; the report (profile.json's content: machine, settings, one row per method)."""
    ids = chat_ids(parts.tokenizer, prompt.text)
    size_static_cache(parts, [ids], spec.max_new_tokens, spec.gamma)
    runners = make_runners(parts, spec.max_new_tokens, spec.gamma, spec.methods)
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [profile_method(name, runners[name], ids, parts.split.device, out, spec.trace)
            for name in spec.methods if name in runners]
    return {**machine_info(parts), "model": spec.model, "prompt": prompt.id, "max_new_tokens": spec.max_new_tokens,
            "gamma": spec.gamma, "methods": rows}


def profile_method(name: str, runner, ids: list[int], device, out: Path, trace: bool) -> dict:
    """One warm-up run, then one profiled run of `runner` on `ids`: per-token times and kernel counts."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from selfspec.device import synchronize

    runner(ids)  # allocates, picks kernels, captures graphs: not what a steady-state token costs
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        tokens, _ = runner(ids)
        synchronize(device)
        wall = time.perf_counter() - start
    n = max(len(tokens), 1)
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    gpu_s = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    averages = prof.key_averages()
    cpu_s = sum(e.self_cpu_time_total for e in averages) / 1e6
    sort_by = "self_device_time_total" if kernels else "self_cpu_time_total"
    (out / f"{name}.txt").write_text(averages.table(sort_by=sort_by, row_limit=30) + "\n")
    if trace:
        prof.export_chrome_trace(str(out / f"{name}.trace.json"))
    return {"name": name, "tokens": len(tokens), "wall_ms_per_token": 1e3 * wall / n,
            "tokens_per_s": len(tokens) / wall, "cpu_op_ms_per_token": 1e3 * cpu_s / n,
            "gpu_ms_per_token": 1e3 * gpu_s / n if kernels else None,
            "kernels_per_token": len(kernels) / n if kernels else None,
            "gpu_busy": gpu_s / wall if kernels else None}
