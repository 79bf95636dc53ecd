"""`dvi bench`: Hugging Face generate vs dvi on the same prompts; prints a table, writes JSON."""
from __future__ import annotations

from dvi.cli.args import add_model_args, load_model_parts_from
from dvi.report.format import fixed, write_report
from dvi.studies.methods import EXTRA_METHODS, METHODS, parse_methods


def add_parser(sub, name):
    p = sub.add_parser(name, help=f"benchmark {', '.join(METHODS)}", description=__doc__)
    add_model_args(p)
    p.add_argument("--prompts", default="builtin",
                   help="`builtin`, `humaneval`, `spec-bench` (Spec-Bench's questions: `dvi data fetch spec-bench` first), "
                        "or a Spec-Bench-format JSONL path (default: builtin)")
    p.add_argument("--n", type=int, default=14, help="number of prompts, categories interleaved (default: 14)")
    p.add_argument("--offset", type=int, default=0,
                   help="skip this many prompts first (e.g. 440 of Spec-Bench's 480: held-out prompts of `dvi online`)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--gamma", type=int, default=4, help="draft length for dvi_spec, cap for dvi_spec_dynamic")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset (hf_ar always runs), also {', '.join(EXTRA_METHODS)} "
                        "(default: all but those)")
    p.add_argument("--out", default="runs/bench.json", help="JSON report path (default: runs/bench.json)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dvi.model_checks import check_decoding_args
    from selfspec.prompts import load_prompts

    methods = parse_methods(args.methods)
    prompts = load_prompts(args.prompts, args.n, args.offset)  # before torch: a missing file fails at once
    if not prompts:
        raise ValueError(f"--offset {args.offset} --n {args.n}: no prompts left in {args.prompts}")
    check_decoding_args(args)  # --exit-layer, --head-path, --max-new-tokens against the model, before torch loads
    from dvi.studies.bench import run_bench
    from selfspec.model import quiet_transformers

    quiet_transformers()
    parts = load_model_parts_from(args)
    parts.meta.setdefault("base_model", args.model)
    parts.meta["path"] = args.head_path
    report = run_bench(parts, prompts, args.max_new_tokens, args.gamma, methods)
    print_table(report)
    write_report(report, args.out)
    return 0


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    where = f"{report['machine']} ({report.get('device', 'cpu')}, {report.get('dtype', 'float32')})"
    table = Table(title=f"{report['model']} on {where}, {report['n_prompts']} prompts x "
                        f"{report['max_new_tokens']} new tokens, exit layer {report['exit_layer']}, gamma {report['gamma']}")
    for col in ("method", "tok/s", "speedup", "MAL", "accept", "identical", "draft/verify time"):
        table.add_column(col, justify="right")
    for m in report["methods"]:
        split = m.get("time_split")
        table.add_row(m["name"], f"{m['tokens_per_s']:.2f}", f"{m['speedup']:.2f}x", fixed(m["mean_accepted_length"]),
                      fixed(m["acceptance_rate"]), f"{m['identical_to_ar']:.0%}",
                      f"{split['draft']:.0%}/{split['verify']:.0%}" if split else "-")
    Console(width=120).print(table)
