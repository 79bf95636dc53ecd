"""`dvi bench-serve`: replay a dvi trace against any OpenAI-compatible endpoint (`dvi serve`, vLLM, ...) and
report what a client sees, as vLLM's `vllm bench serve` does: request and token throughput, TTFT, TPOT, ITL
and end-to-end latency, and dvi's mean accepted length where the server reports it.

    dvi bench-serve --url http://127.0.0.1:8000/v1 --trace runs/traces/mix.jsonl
    dvi bench-serve --url http://HOST:8000/v1 --trace T.jsonl --arrival '{kind: closed_loop, users: 8}'
    dvi bench-serve --url http://HOST:8000/v1 --trace T.jsonl --arrival '{kind: poisson, rate: 4}' --max-concurrency 16

Requests go out with the trace's own timestamps unless --arrival says otherwise (the arrival processes of
`dvi run`: recorded, immediate, poisson, burst, on_off, closed_loop), through the dispatcher of `dvi run`,
one streamed request at a time per HTTP client (dvi/studies/serve_bench.py). It writes the JSON report at
--out and one record per request next to it (NAME.requests.jsonl).
"""
from __future__ import annotations

import argparse

from dvi.report.format import fixed, write_report


def add_parser(sub, name):
    p = sub.add_parser(name, help="replay a trace against an OpenAI-compatible endpoint and report its latency",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the endpoint's base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--trace", required=True, help="a trace file (JSONL, from `dvi trace make`)")
    p.add_argument("--model", default=None, help="the model to ask for (default: the first the endpoint lists)")
    p.add_argument("--api-key", default=None, help="sent as a Bearer token (default: $DVI_API_KEY, else none)")
    p.add_argument("--arrival", default=None, metavar="SPEC",
                   help="arrival process as YAML, e.g. '{kind: closed_loop, users: 8}', '{kind: poisson, rate: 4}', "
                        "'{kind: recorded, time_scale: 0.5}', immediate (default: the trace's timestamps)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="HTTP clients, each with one request in flight (default: a closed loop's users, else one "
                        "per request, at most 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival process (poisson draws, think times)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default: 600)")
    p.add_argument("--out", default="runs/bench_serve.json", help="JSON report (default: runs/bench_serve.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from dvi.studies.serve_bench import ServeBenchSpec, run_serve_bench

    bench = ServeBenchSpec(args.url, args.trace, args.out, model=args.model,
                           api_key=args.api_key or os.environ.get("DVI_API_KEY"), arrival=args.arrival,
                           max_concurrency=args.max_concurrency, seed=args.seed, timeout_s=args.timeout)
    report = run_serve_bench(bench, progress=not args.no_progress)
    print_table(report)
    write_report(report, args.out)
    print(f"per-request records: {report['requests_file']}")
    return 0


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["summary"]
    arrival = report["arrival"]
    shown = ", ".join(f"{k}={v}" for k, v in arrival.items() if k != "kind")
    table = Table(title="dvi bench-serve")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("requests completed", str(s["completed"])), ("requests failed", str(s["failed"])),
            ("duration (s)", fixed(s["duration_s"])), ("max concurrent requests", str(s["max_concurrent_requests"])),
            ("input tokens", "-" if s["input_tokens"] is None else str(s["input_tokens"])),
            ("output tokens", str(s["output_tokens"])),
            ("request throughput (req/s)", fixed(s["request_throughput"])),
            ("output token throughput (tok/s)", fixed(s["output_tokens_per_s"])),
            ("total token throughput (tok/s)", fixed(s["total_tokens_per_s"]))]
    for key, label in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"),
                       ("e2e_ms", "E2E latency (ms)")):
        stats = s[key] or {}
        rows += [(f"{label} {name}", fixed(stats.get(name))) for name in ("mean", "median", "p90", "p99")]
    if s["mean_accepted_length"] is not None:
        rows.append((f"mean accepted length ({s['requests_with_mal']} requests)", fixed(s["mean_accepted_length"])))
    for i, (label, value) in enumerate(rows):
        table.add_row(label, value, end_section=label.endswith("p99") or i in (1, 8))
    console = Console(width=max(Console().width, 100))  # a pipe reports 80 columns
    console.print(f"{report['model']} at {report['url']}, trace {report['trace']}\narrival {arrival['kind']}"
                  f"{f' ({shown})' if shown else ''}, {report['clients']} clients", markup=False, highlight=False)
    console.print(table)
    for error, count in list(s["errors"].items())[:5]:
        console.print(f"failed x{count}: {error}", markup=False, highlight=False)
    if len(s["errors"]) > 5:
        console.print(f"... and {len(s['errors']) - 5} other errors (see {report['requests_file']})")
