"""`dvi report RUN_DIR`: (re)write a `dvi run` directory's report, report.md with its plots under plots/,
from whatever the run left there (a run that crashed included), and print the report's path."""
from __future__ import annotations


def add_parser(sub, name):
    p = sub.add_parser(name, help="write a run directory's report.md and plots/*.png", description=__doc__)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `dvi run` output directory (summary.json or requests.jsonl)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dvi.report.run import write_run_report

    print(write_run_report(args.run_dir))
    return 0
