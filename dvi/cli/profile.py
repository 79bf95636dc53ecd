"""`dvi profile`: where a decoding method's time goes, per generated token (torch.profiler).

For each method, one prompt is decoded once unprofiled (warm-up, graph capture) and once under
torch.profiler. Per token it reports the wall time, the CPU time spent in torch operators, and on CUDA the
kernel time, the kernel count and the fraction of the wall time the GPU was busy: at batch 1 a small
model is launch-bound when the GPU idles most of each step. Writes profile.json, a per-method operator
table (<method>.txt, sorted by device time on CUDA, CPU time elsewhere) and, with --trace, Chrome traces
(open them in Perfetto).
"""
from __future__ import annotations

from pathlib import Path

from dvi.common_args import add_model_args, load_drafter_from, quiet_transformers
from dvi.report_file import write_report

DEFAULT_METHODS = "hf_ar,dvi_ar,dvi_spec_ngram_dynamic"


def add_parser(sub, name):
    p = sub.add_parser(name, help="profile decoding methods per token (CPU time, GPU kernels, GPU idle)",
                       description=__doc__)
    add_model_args(p)
    p.add_argument("--prompts", default="builtin", help="`builtin`, `humaneval`, `spec-bench`, or a Spec-Bench-format JSONL path")
    p.add_argument("--offset", type=int, default=0, help="profile the prompt at this index (default: 0)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated dvi bench methods (default: {DEFAULT_METHODS})")
    p.add_argument("--trace", action="store_true", help="also write a Chrome trace per method")
    p.add_argument("--out", default="runs/profile", help="output directory (default: runs/profile)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dvi.model_checks import check_decoding_args

    check_decoding_args(args)  # --exit-layer, --drafter, --max-new-tokens against the model, before torch loads
    from dvi.bench import machine_info, make_runners, size_static_cache
    from dvi.bench_cmd import parse_methods
    from selfspec.prompts import chat_ids, load_prompts

    quiet_transformers()
    methods = parse_methods(args.methods)
    prompts = load_prompts(args.prompts, 1, args.offset)
    if not prompts:
        raise ValueError(f"--offset {args.offset}: no prompt there in {args.prompts}")
    drafter = load_drafter_from(args)
    ids = chat_ids(drafter.tokenizer, prompts[0].text)
    size_static_cache(drafter, [ids], args.max_new_tokens, args.gamma)
    runners = make_runners(drafter, args.max_new_tokens, args.gamma, methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [profile_method(name, runners[name], ids, drafter.split.device, out, args.trace)
            for name in methods if name in runners]
    report = {**machine_info(drafter), "model": args.model, "prompt": prompts[0].id, "max_new_tokens": args.max_new_tokens,
              "gamma": args.gamma, "methods": rows}
    print_table(report)
    write_report(report, out / "profile.json")
    return 0


def profile_method(name: str, runner, ids: list[int], device, out: Path, trace: bool) -> dict:
    """One warm-up run, then one profiled run of `runner` on `ids`: per-token times and kernel counts."""
    import time

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


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['model']} on {report['machine']} ({report['device']}, {report['dtype']}, "
                        f"steps {report['steps']}), {report['max_new_tokens']} new tokens")
    for col in ("method", "tok/s", "wall ms/tok", "CPU op ms/tok", "GPU ms/tok", "kernels/tok", "GPU busy"):
        table.add_column(col, justify="right")
    for m in report["methods"]:
        gpu = m["gpu_ms_per_token"] is not None
        table.add_row(m["name"], f"{m['tokens_per_s']:.1f}", f"{m['wall_ms_per_token']:.2f}", f"{m['cpu_op_ms_per_token']:.2f}",
                      f"{m['gpu_ms_per_token']:.2f}" if gpu else "-", f"{m['kernels_per_token']:.0f}" if gpu else "-",
                      f"{m['gpu_busy']:.0%}" if gpu else "-")
    Console(width=120).print(table)
