"""The `dvi` command line: one entry point, one module per subcommand (each exposes `add_parser`)."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand module -> one-line help; modules are imported lazily so `dvi --help` stays fast.
COMMANDS = {
    "generate": "dvi.generate_cmd",
    "bench": "dvi.bench_cmd",
    "profile": "dvi.profile_cmd",  # where a method's time goes per token (torch.profiler)
    "online": "dvi.online_cmd",
    "ablate": "dvi.ablate_cmd",
    "synth-prompts": "dvi.synth_prompts_cmd",
    "redis": "dvi.redis_cmd",
    "bench-buffer": "dvi.bench_buffer_cmd",
    "trace": "dvi.trace_cmd",
    "learner": "dvi.learner_cmd", "bench-learner": "dvi.bench_learner_cmd",  # learner/ (DeepSpeed ranks)
    "run": "dvi.run_cmd",  # actors + learner + Redis, replaying a trace
    "eval": "dvi.eval_cmd",
    "report": "dvi.report_cmd",
    "drift": "dvi.drift_cmd",  # arms of dvi run on one shifting trace
}


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvi",
        description="Online self-speculative decoding: a shallow drafter that learns from the full model.",
        epilog="Start with `dvi generate --prompt 'Hello'`, then `dvi bench --n 12`. `dvi CMD --help` for details.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError, ConnectionError) as err:
        print(f"dvi {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
