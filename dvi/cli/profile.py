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

from dvi.cli.args import add_model_args, load_model_parts_from
from dvi.report.format import write_report

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

    check_decoding_args(args)  # --exit-layer, --head-path, --max-new-tokens against the model, before torch loads
    from dvi.studies.methods import parse_methods
    from dvi.studies.profile import ProfileSpec, run_profile
    from selfspec.model import quiet_transformers
    from selfspec.prompts import load_prompts

    quiet_transformers()
    methods = parse_methods(args.methods)
    prompts = load_prompts(args.prompts, 1, args.offset)
    if not prompts:
        raise ValueError(f"--offset {args.offset}: no prompt there in {args.prompts}")
    parts = load_model_parts_from(args)
    out = Path(args.out)
    spec = ProfileSpec(methods, args.max_new_tokens, args.gamma, out, args.trace, args.model)
    report = run_profile(parts, prompts[0], spec)
    print_table(report)
    write_report(report, out / "profile.json")
    return 0


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['model']} on {report['machine']} ({report['device']}, {report['dtype']}, "
                        f"passes {report['passes']}), {report['max_new_tokens']} new tokens")
    for col in ("method", "tok/s", "wall ms/tok", "CPU op ms/tok", "GPU ms/tok", "kernels/tok", "GPU busy"):
        table.add_column(col, justify="right")
    for m in report["methods"]:
        gpu = m["gpu_ms_per_token"] is not None
        table.add_row(m["name"], f"{m['tokens_per_s']:.1f}", f"{m['wall_ms_per_token']:.2f}", f"{m['cpu_op_ms_per_token']:.2f}",
                      f"{m['gpu_ms_per_token']:.2f}" if gpu else "-", f"{m['kernels_per_token']:.0f}" if gpu else "-",
                      f"{m['gpu_busy']:.0%}" if gpu else "-")
    Console(width=120).print(table)
