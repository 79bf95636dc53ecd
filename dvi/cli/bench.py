"""`dvi bench`: Hugging Face generate vs dvi on the same prompts, one at a time or (--concurrency) N in flight at
once; prints tables, writes JSON."""
from __future__ import annotations

import argparse

from dvi.cli.args import add_model_args, load_model_parts_from
from dvi.report.format import fixed, write_report
from dvi.studies.methods import CONCURRENT_DEFAULT, CONCURRENT_METHODS, EXTRA_METHODS, METHODS, parse_methods


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
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset (hf_ar always runs), also {', '.join(EXTRA_METHODS)} "
                        "(default: all but those); with --concurrency, of "
                        f"{', '.join(CONCURRENT_METHODS)} (default: {', '.join(CONCURRENT_DEFAULT)})")
    p.add_argument("--concurrency", type=_levels, default=None, metavar="N[,N...]",
                   help="instead of batch 1: for each N, N requests in flight on one model (N clients, each "
                        "sending its next prompt when its last one is answered); hf_ar runs at batch 1 only, "
                        "as the reference for identical_to_ar")
    p.add_argument("--repeat", type=int, default=1,
                   help="with --concurrency: run every level this many times, methods interleaved, and report "
                        "each cell's median run (the machine's noise shows in tokens_per_s_runs; default: 1)")
    p.add_argument("--out", default="runs/bench.json", help="JSON report path (default: runs/bench.json)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dvi.model_checks import check_decoding_args
    from selfspec.prompts import load_prompts

    if args.gamma < 0:  # before the model loads: a cost-aware policy would first time passes of no width
        raise ValueError(f"--gamma must be >= 0, got {args.gamma}")
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    if args.concurrency:
        methods = parse_methods(args.methods or ",".join(CONCURRENT_DEFAULT), CONCURRENT_METHODS)
    else:
        methods = parse_methods(args.methods or ",".join(METHODS))
    prompts = load_prompts(args.prompts, args.n, args.offset)  # before torch: a missing file fails at once
    if not prompts:
        raise ValueError(f"--offset {args.offset} --n {args.n}: no prompts left in {args.prompts}")
    check_decoding_args(args)  # --exit-layer, --head-path, --max-new-tokens against the model, before torch loads
    from dvi.studies.bench import Concurrency, run_bench, run_concurrency_bench
    from selfspec.model import quiet_transformers

    quiet_transformers()
    parts = load_model_parts_from(args)
    parts.meta.setdefault("base_model", args.model)
    parts.meta["path"] = args.head_path
    if args.concurrency:
        report = run_concurrency_bench(parts, prompts, args.max_new_tokens, args.gamma,
                                       Concurrency(args.concurrency, methods, args.repeat))
    else:
        report = run_bench(parts, prompts, args.max_new_tokens, args.gamma, methods)
    print_table(report)
    if args.concurrency:
        print_concurrency_tables(report)
    write_report(report, args.out)
    return 0


def _levels(text: str) -> tuple[int, ...]:
    """--concurrency: comma-separated request counts, each >= 1, in the order given, each once."""
    try:
        levels = tuple(dict.fromkeys(int(n) for n in text.split(",") if n.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected request counts like 1,4,8, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"expected request counts >= 1 like 1,4,8, got {text!r}")
    return levels


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


def print_concurrency_tables(report: dict) -> None:
    """by_concurrency as two tables, a column per N: total tokens/s (and per request), then TTFT and latency
    medians (and how many outputs are identical to hf_ar's at batch 1)."""
    from rich.console import Console
    from rich.table import Table

    levels = report["by_concurrency"]
    names = list(next(iter(levels.values())))
    where = f"{report['machine']} ({report.get('device', 'cpu')}, {report.get('dtype', 'float32')})"
    runs = f", median of {report['repeat']} runs" if report.get("repeat", 1) > 1 else ""
    tables = (Table(title=f"N requests in flight on {where}: total tok/s (per request), mean batch{runs}"),
              Table(title="TTFT p50 / latency p50 (s), identical to hf_ar at batch 1"))
    for table in tables:
        table.add_column("method", justify="right")
        for n in levels:
            table.add_column(f"N={n}", justify="right")
    for name in names:
        cells = [levels[n][name] for n in levels]
        tables[0].add_row(name, *(f"{c['tokens_per_s']:.2f} ({c['tokens_per_s_per_request']:.2f})"
                                  + (f", {c['mean_batch_size']:.2f}" if c.get("mean_batch_size") else "")
                                  for c in cells))
        tables[1].add_row(name, *(f"{c['ttft_p50_s']:.3f} / {c['latency_p50_s']:.2f}, {c['identical_to_ar']:.0%}"
                                  for c in cells))
    console = Console(width=120)
    for table in tables:
        console.print(table)
