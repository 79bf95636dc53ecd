"""`dvi trace make`: write a traffic trace (JSONL) from a workload spec, so an experiment's traffic is a
file; `dvi trace check`: read a trace, report its bad lines and summarise it.

    dvi trace make --config configs/traces/drift_demo.yaml --out runs/traces/drift.jsonl
    dvi trace make --source builtin --source humaneval --n 200 --rate 2 --out runs/traces/mix.jsonl

A spec (see configs/traces/drift_demo.yaml): n, seed, max_new_tokens, temperature, sources (spec_bench,
humaneval, builtin, prompts), schedule (uniform, phases, mixture), arrival (immediate, poisson, burst,
on_off). The same spec and seed always write the same file. Paths in a spec are relative to the
current directory.
"""
from __future__ import annotations

import argparse


def add_parser(sub, name):
    raw = argparse.RawDescriptionHelpFormatter  # keep the examples' lines
    p = sub.add_parser(name, help="write a traffic trace from a workload spec, or check one", description=__doc__,
                       formatter_class=raw)
    actions = p.add_subparsers(dest="trace_action", required=True, metavar="ACTION")

    make = actions.add_parser("make", help="write a trace from a spec (YAML) and/or flags", description=__doc__,
                              formatter_class=raw)
    make.add_argument("--config", default=None, help="trace spec YAML (e.g. configs/traces/drift_demo.yaml)")
    make.add_argument("--out", required=True, help="the trace file to write (JSONL)")
    make.add_argument("--source", action="append", default=None, metavar="SOURCE",
                      help="builtin, humaneval, spec-bench, a Spec-Bench .jsonl path, or a text file with one prompt per line; "
                           "repeatable; replaces the spec's sources")
    make.add_argument("--n", type=int, default=None, help="number of requests")
    make.add_argument("--rate", type=float, default=None, help="Poisson arrivals at this many requests/s")
    make.add_argument("--max-new-tokens", type=int, default=None)
    make.add_argument("--temperature", type=float, default=None)
    make.add_argument("--seed", type=int, default=None)
    make.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override any spec key (YAML value), e.g. --set arrival.rate=4; repeatable")
    make.set_defaults(func=run_make)

    check = actions.add_parser("check", help="report a trace's bad lines and summarise it")
    check.add_argument("trace", help="a trace file (JSONL)")
    check.set_defaults(func=run_check)


def source_spec(text: str) -> dict:
    """A --source value as a source spec."""
    if text in ("builtin", "humaneval"):
        return {"kind": text}
    if text == "spec-bench":
        return {"kind": "spec_bench"}
    return {"kind": "spec_bench" if text.endswith(".jsonl") else "prompts", "path": text}


def spec_overrides(args) -> dict:
    from dvi.config import cli_overrides

    flags = {"n": args.n, "seed": args.seed, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
             "sources": [source_spec(s) for s in args.source] if args.source else None,
             "arrival": {"kind": "poisson", "rate": args.rate} if args.rate is not None else None}
    return cli_overrides(args.set, flags, "arrival.rate=4")


def run_make(args) -> int:
    from actors.trace import write_trace
    from actors.traffic import TraceSpec, make_trace
    from dvi.config import load_config

    if args.config is None and not args.source:
        raise ValueError("give a spec with --config, or sources with --source (e.g. --source builtin --n 50)")
    spec = load_config(TraceSpec, args.config, spec_overrides(args))
    trace = make_trace(spec)
    write_trace(trace, args.out)
    print_summary(trace)
    print(f"{len(trace)} requests written to {args.out} (seed {spec.seed})")
    return 0


def run_check(args) -> int:
    from actors.trace import read_trace

    trace, errors = read_trace(args.trace)
    for error in errors:
        print(error)
    print_summary(trace)
    print(f"{args.trace}: {len(trace)} good requests, {len(errors)} bad lines")
    return 1 if errors else 0


def print_summary(trace) -> None:
    from rich.console import Console
    from rich.table import Table

    from actors.traffic import trace_summary

    table = Table(title="requests per workload")
    for column in ("workload", "requests", "later turns", "exact repeats", "first arrival (s)", "last arrival (s)"):
        table.add_column(column, justify="left" if column == "workload" else "right")
    for row in trace_summary(trace):
        table.add_row(row["workload"], str(row["requests"]), str(row["later_turns"]), str(row["repeats"]),
                      f"{row['first_s']:.2f}", f"{row['last_s']:.2f}")
    span = max((r.arrival_s for r in trace), default=0.0) - min((r.arrival_s for r in trace), default=0.0)
    table.caption = f"arrival span {span:.2f} s"
    Console(width=120).print(table)
