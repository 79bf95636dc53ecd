"""`dvi run`: generation actors serve a replayed trace with self-speculative decoding and stream what the
verifier decided to a Redis buffer; a DeepSpeed learner trains the drafter head from it and publishes
versions the actors pull while they serve.

    dvi run --config configs/local.yaml                      # this machine: embedded Redis, local Ray
    dvi run --config configs/local.yaml --set actors.count=3 --set learner.lr=3e-4
    ray job submit --working-dir . -- dvi run --config configs/gpu.yaml   # a cluster (docs/cluster.md)

It writes a run directory (out_dir): config.yaml and trace.jsonl (rerun from them), requests.jsonl,
metrics.jsonl, tb/ (TensorBoard), learner/ (its metrics, versions, every published head under
heads/vNNNN), summary.json and report.md with plots.
"""
from __future__ import annotations

import argparse


def add_parser(sub, name):
    p = sub.add_parser(name, help="serve a trace with Ray actors while a DeepSpeed learner improves the drafter",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/local.yaml", help="run config YAML (default: configs/local.yaml)")
    p.add_argument("--out-dir", default=None, help="the run directory (out_dir)")
    p.add_argument("--run-id", default=None, help="Redis key prefix dvi:{run_id}: (default: the run directory's name)")
    p.add_argument("--redis-url", default=None, help="redis://HOST:PORT of a running server (redis.url); "
                                                     "default: start one inside the run directory")
    p.add_argument("--actors", type=int, default=None, help="generation actors (actors.count)")
    p.add_argument("--trace", default=None, help="a trace file (trace.path) instead of the config's")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, dotted for nested ones (YAML value), e.g. --set learn=false")
    p.set_defaults(func=run)


def run(args) -> int:
    from dvi.config import cli_overrides, load_config
    from dvi.model_checks import check_run
    from dvi.run.config import RunConfig
    from dvi.run.runner import run as run_system

    flags = {"out_dir": args.out_dir, "run_id": args.run_id, "redis.url": args.redis_url,
             "actors.count": args.actors, "trace.path": args.trace}
    cfg = load_config(RunConfig, args.config, cli_overrides(args.set, flags, "actors.count=3"))
    check_run(cfg)  # the exit layer, lengths, vocabulary and heads against the model, before Ray starts
    run_dir, summary = run_system(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    report = _report(run_dir)
    print_summary(summary)
    print(f"run directory: {run_dir}  (summary.json, requests.jsonl, metrics.jsonl, tb/, learner/)")
    if report is not None:
        print(f"report: {report}")
    if summary.get("last_head"):
        print(f"last published head: {summary['last_head']}  (dvi bench --head-path {summary['last_head']})")
    return 0


def _report(run_dir):
    from dvi.report.run import write_run_report

    return write_run_report(run_dir)


def print_summary(summary: dict, command: str = "dvi run") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{command} {summary.get('run_id', '')}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    keys = ("requests_completed", "requests_failed", "tokens_per_s_first_window", "tokens_per_s_last_window",
            "live_mal_first_window", "live_mal_last_window", "versions_published", "versions_held_back",
            "mal_first_window", "mal_last_window", "transitions_written", "transitions_trained", "transitions_dropped",
            "transitions_buffered", "deadletter", "counts_balance", "wall_s")
    for key in keys:
        if key in summary:
            value = summary[key]
            table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    Console().print(table)
