"""The `dvi` command line: one entry point, one module per subcommand in this package (each exposes
`add_parser(sub, name)`; it parses, calls the library in dvi.run, dvi.studies or dvi.report, and prints).
No library module imports this package."""
from __future__ import annotations

import argparse
import importlib
import sys

from dvi.errors import USER_ERRORS, UserError  # noqa: F401 (UserError: `from dvi.cli import UserError`)

# subcommand module -> one-line help; modules are imported lazily so `dvi --help` stays fast.
COMMANDS = {
    "generate": "dvi.cli.generate",
    "bench": "dvi.cli.bench",
    "profile": "dvi.cli.profile",  # where a method's time goes per token (torch.profiler)
    "online": "dvi.cli.online",
    "ablate": "dvi.cli.ablate",
    "synth-prompts": "dvi.cli.synth_prompts",
    "redis": "dvi.cli.redis",
    "bench-buffer": "dvi.cli.bench_buffer",
    "bench-memory": "dvi.cli.bench_memory",  # the traffic memory at its bound
    "trace": "dvi.cli.trace",
    "learner": "dvi.cli.learner", "bench-learner": "dvi.cli.bench_learner",  # learner/ (DeepSpeed ranks)
    "run": "dvi.cli.run",  # actors + learner + Redis, replaying a trace
    "serve": "dvi.cli.serve",  # the same system behind an OpenAI-compatible endpoint (Ray Serve)
    "bench-serve": "dvi.cli.bench_serve",  # a trace against any OpenAI-compatible endpoint (vllm bench serve)
    "eval": "dvi.cli.eval",
    "report": "dvi.cli.report",
    "drift": "dvi.cli.drift",  # arms of dvi run on one shifting trace
    "data": "dvi.cli.data",  # data sets into the cache: `dvi data fetch spec-bench`
}


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
    except Exception as err:
        ray_line = ray_failure(err)
        if ray_line is not None:  # a Ray actor or task failed: its cause in one line, not Ray's traceback
            print(f"dvi {args.command}: error: {ray_line}", file=sys.stderr)
            return 2 if isinstance(_ray_cause(err), USER_ERRORS) else 1
        if isinstance(err, USER_ERRORS):
            print(f"dvi {args.command}: error: {err}", file=sys.stderr)
            return 2
        raise


def _ray_cause(err: BaseException) -> BaseException | None:
    """The exception raised inside a Ray task or actor (nested task errors unwrapped); None for others."""
    exceptions = sys.modules.get("ray.exceptions")  # only a command that started Ray can get its errors
    if exceptions is None or not isinstance(err, exceptions.RayError):
        return None
    cause = err
    while isinstance(cause, exceptions.RayTaskError) and isinstance(getattr(cause, "cause", None), BaseException):
        cause = cause.cause
    return cause


def ray_failure(err: BaseException) -> str | None:
    """One line for a Ray task or actor failure: `Type: message` of its cause (where Ray kept it), else the
    last `Type: message` line of Ray's report, which holds the remote traceback."""
    cause = _ray_cause(err)
    if cause is None:
        return None
    exceptions = sys.modules["ray.exceptions"]
    if not isinstance(cause, exceptions.RayError):
        lines = str(cause).strip().splitlines()
        text = lines[0] if lines else ""
        return text if isinstance(cause, USER_ERRORS) and text else f"{type(cause).__name__}: {text}".rstrip(": ")
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith(("File ", "^", "Traceback")) and ": " in line
              and line.split(":", 1)[0].replace(".", "").isidentifier() and line.split(":", 1)[0].endswith(("Error", "Exception"))]
    return errors[-1] if errors else (lines[0] if lines else type(cause).__name__)
