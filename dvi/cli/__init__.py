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
    "data": "dvi.data_cmd",  # data sets into the cache: `dvi data fetch spec-bench`
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
    except Exception as err:
        ray_line = ray_failure(err)
        if ray_line is not None:  # a Ray actor or task failed: its cause in one line, not Ray's traceback
            print(f"dvi {args.command}: error: {ray_line}", file=sys.stderr)
            return 2 if isinstance(_ray_cause(err), USER_ERRORS) else 1
        if isinstance(err, USER_ERRORS):
            print(f"dvi {args.command}: error: {err}", file=sys.stderr)
            return 2
        raise


USER_ERRORS = (UserError, ValueError, FileNotFoundError, ConnectionError)


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


if __name__ == "__main__":
    sys.exit(main())
