"""`dvi eval`: a drafter on Spec-Bench questions, every turn (multi-turn questions with their history), against
Hugging Face greedy decoding at batch 1: speedup, mean accepted length, acceptance rate and identity with
hf_ar per category and overall. Prints a table, writes JSON."""
from __future__ import annotations

from dvi.cli.args import add_model_args, load_model_parts_from
from dvi.errors import UserError
from dvi.report.format import fixed, write_report
from dvi.studies.methods import METHODS

DEFAULT_QUESTIONS = "spec-bench"  # DVI_SPEC_BENCH, else the copy `dvi data fetch spec-bench` downloads
DVI_METHODS = tuple(m for m in METHODS if m.startswith("dvi_"))


def add_parser(sub, name):
    p = sub.add_parser(name, help="evaluate a drafter on Spec-Bench questions (per category, multi-turn)",
                       description=__doc__)
    add_model_args(p)
    p.add_argument("--run", default=None, metavar="DIR",
                   help="take the drafter from a run directory's published heads (DIR/learner/heads/vNNNN)")
    p.add_argument("--version", default="latest",
                   help="with --run: the head version N to evaluate, or `latest` (default)")
    p.add_argument("--questions", default=DEFAULT_QUESTIONS,
                   help="a Spec-Bench-format question.jsonl, or `spec-bench` (default): Spec-Bench's own, "
                        "downloaded by `dvi data fetch spec-bench` (DVI_SPEC_BENCH names a local copy instead)")
    p.add_argument("--categories", default=None, help="comma-separated categories (default: all in the file)")
    p.add_argument("--n-per-category", type=int, default=None, help="at most N questions of each category")
    p.add_argument("--method", default="dvi_spec_ngram_dynamic", choices=DVI_METHODS,
                   help="the dvi method to evaluate (default: dvi_spec_ngram_dynamic)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--gamma", type=int, default=4, help="draft length (the cap for the dynamic methods)")
    p.add_argument("--out", default="runs/eval.json", help="JSON report path (default: runs/eval.json)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dvi.model_checks import check_decoding_args
    from dvi.studies.eval import EvalSpec, report, run_eval, run_head_dir, select_questions
    from selfspec.prompts import prompt_file, spec_bench_prompts

    if args.run and args.head_path:
        raise UserError("give --head-path DIR or --run DIR [--version N], not both")
    if args.n_per_category is not None and args.n_per_category < 1:
        raise UserError(f"--n-per-category must be >= 1, got {args.n_per_category}")
    questions_file = prompt_file(args.questions)  # `spec-bench` without the file: how to get it
    if not questions_file.is_file():
        raise UserError(f"question file {args.questions} not found (pass --questions PATH to a Spec-Bench question.jsonl, "
                        f"or leave it out for Spec-Bench's own after `dvi data fetch spec-bench`)")
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    questions = select_questions(spec_bench_prompts(questions_file), categories, args.n_per_category)
    if not questions:
        raise UserError(f"no questions in {args.questions}")
    head_dir = str(run_head_dir(args.run, args.version)) if args.run else args.head_path
    check_decoding_args(args, head_dir)  # the model's layers and positions, the head's shape, before a model loads

    from selfspec.model import quiet_transformers

    quiet_transformers()
    parts = load_model_parts_from(args, head_dir)
    parts.meta.setdefault("base_model", args.model)
    parts.meta["path"] = head_dir
    spec = EvalSpec(args.method, args.max_new_tokens, args.gamma, args.questions)
    turns, runs = run_eval(parts, questions, spec)
    out = report(parts, questions, turns, runs, spec)
    print_table(out)
    write_report(out, args.out)
    return 0


def table_rows(summary: dict) -> list[list[str]]:
    """One row per category, then `overall`: category, turns, speedup, MAL, acceptance, identical turns."""
    def row(name: str, s: dict) -> list[str]:
        return [name, str(s["turns"]), f"{s['speedup']:.2f}x", fixed(s["mean_accepted_length"]),
                fixed(s["acceptance_rate"]), f"{s['identical_turns']}/{s['turns']}"]
    return [row(c, s) for c, s in summary["categories"].items()] + [row("overall", summary["overall"])]


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    console.print(f"{report['method']} vs hf_ar: {report['model']} on {report['machine']}, "
                  f"{report['n']['questions']} questions ({report['n']['turns']} turns) x "
                  f"{report['max_new_tokens']} new tokens, exit layer {report['exit_layer']}, "
                  f"drafter {report.get('head_path') or 'untrained head'}", highlight=False)
    table = Table()
    for i, col in enumerate(("category", "turns", "speedup", "MAL", "accept", "identical")):
        table.add_column(col, justify="left" if i == 0 else "right")
    rows = table_rows(report)
    for i, row in enumerate(rows):
        table.add_row(*row, end_section=i == len(rows) - 2)
    console.print(table)
