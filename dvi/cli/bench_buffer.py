"""`dvi bench-buffer`: throughput of the replay buffer through a real redis-server, and weight sync latency
(dvi/studies/buffer_bench.py measures; this prints the table and writes the JSON)."""
from __future__ import annotations

from dvi.report.format import write_report


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="benchmark the Redis replay buffer and weight store",
                              description="Write and read transitions through a fresh local redis-server, "
                                          "publish and pull head weights; print a table and write JSON.")
    p.add_argument("--out", default="runs/bench_buffer.json", help="JSON report (default: runs/bench_buffer.json)")
    p.add_argument("--n", type=int, default=20_000, help="SmolLM2-sized transitions per run; 7B-sized use n/5")
    p.add_argument("--frame-size", type=int, default=16, help="transitions per stream entry")
    p.add_argument("--write-batch", type=int, default=256, help="transitions per pipelined flush")
    p.add_argument("--persistence", action="store_true",
                   help="run the server with AOF everysec, as `dvi redis start` does by default")
    p.set_defaults(func=run)


def run(args) -> int:
    from dvi.studies.buffer_bench import run_buffer_bench

    report = run_buffer_bench(args.n, args.frame_size, args.write_batch, args.persistence)
    print_table(report)
    write_report(report, args.out)
    return 0


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"replay buffer, redis {report['redis_version']}, frame {report['frame_size']}, "
                        f"{'AOF everysec' if report['persistence'] else 'no persistence'}")
    for col in ("record", "n", "write/s", "read+ack/s", "B/transition", "MB/10k", "enc µs", "dec µs"):
        table.add_column(col, justify="left" if col == "record" else "right")
    for name, r in report["records"].items():
        table.add_row(name, str(r["n"]), f"{r['write_tps']:,}", f"{r['read_tps']:,}", f"{r['bytes_per_transition']:,}",
                      f"{r['redis_mb_per_10k']}", f"{r['encode_us']}", f"{r['decode_us']}")
    console = Console(width=max(Console().width, 100))  # a pipe reports 80 columns, too few for the table
    console.print(table)
    w = report["weights"]
    console.print(f"weights ({w['blob_mb']} MB float32 head): publish {w['weight_publish_ms']} ms, "
                  f"pull {w['weight_pull_ms']} ms, poll {w['weight_poll_ms']} ms (medians of 10)")
