"""`dvi bench-memory`: what the traffic memory (actors.memory) costs at its bound: memory, proposal time
against a decode step, the Redis stream and a new actor's catch-up (dvi/studies/memory_bench.py measures;
this prints the table and writes the JSON)."""
from __future__ import annotations

from dvi.report.format import write_report


def add_parser(subparsers, name: str) -> None:
    from actors.config import MemoryConfig

    bounds = MemoryConfig()
    p = subparsers.add_parser(name, help="benchmark the traffic memory at its bound",
                              description="Fill a suffix index to its token bound with Spec-Bench's questions (then "
                                          "Zipf-drawn tokens), time proposals against a plain decode step, and "
                                          "read the served stream back through a fresh local redis-server.")
    p.add_argument("--model", default="smollm2-135m", help="whose tokenizer and decode step (default: smollm2-135m)")
    p.add_argument("--prompts", default="spec-bench", help="Spec-Bench-format questions (default: spec-bench, after "
                                                           "`dvi data fetch spec-bench`)")
    p.add_argument("--max-tokens", type=int, default=bounds.max_tokens, help="the bound (actors.memory_bounds.max_tokens)")
    p.add_argument("--sequence-tokens", type=int, default=256, help="tokens per stored sequence")
    p.add_argument("--stream-maxlen", type=int, default=bounds.stream_maxlen, help="the served stream's cap")
    p.add_argument("--out", default="runs/bench_memory.json", help="JSON report (default: runs/bench_memory.json)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dvi.studies.memory_bench import run_memory_bench
    from selfspec.loading import load_model_parts
    from selfspec.prompts import chat_ids, spec_bench_prompts

    parts = load_model_parts(args.model)
    questions = [chat_ids(parts.tokenizer, p.text) for p in spec_bench_prompts(args.prompts)]
    report = run_memory_bench(parts, questions, args.max_tokens, args.sequence_tokens, args.stream_maxlen)
    print_table(report)
    write_report(report, args.out)
    return 0


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"traffic memory at {report['tokens']:,} tokens ({report['sequences']:,} sequences)")
    for col in ("index MB", "insert tok/s", "propose p50 / p99 µs", "decode step ms", "p50 / step",
                "stream entries", "stream MB", "catch-up s"):
        table.add_column(col, justify="right")
    s = report["stream"]
    table.add_row(f"{report['index_mb']}", f"{report['insert_tokens_per_s']:,}",
                  f"{report['propose_p50_us']} / {report['propose_p99_us']}", f"{report['decode_step_ms']}",
                  f"{report['propose_p50_share_of_step']:.2%}", f"{s['entries']:,}", f"{s['stream_mb']}",
                  f"{s['catch_up_s']}")
    Console(width=max(Console().width, 120)).print(table)
