"""`dvi ablate`: the same online run under several schedules, on the same prompts; one table and plot."""
from __future__ import annotations

from dvi.cli.args import add_online_args, online_overrides


def add_parser(sub, name):
    p = sub.add_parser(name, help="compare training schedules (kl_rl, kl_only, ce_only, pg_only) on the same prompts",
                       description=__doc__)
    add_online_args(p)
    p.add_argument("--schedules", default="kl_rl,kl_only,ce_only,pg_only")
    p.add_argument("--out-dir", default="runs/ablate")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from dvi.config import load_config
    from dvi.model_checks import check_online
    from selfspec.config import OnlineConfig

    base = load_config(OnlineConfig, args.config, online_overrides(args))
    check_online(base)

    from dvi.studies.online import ablate
    from selfspec.model import quiet_transformers

    quiet_transformers()
    out = Path(args.out_dir)
    rows = ablate(base, [s.strip() for s in args.schedules.split(",") if s.strip()], out)
    print_table(rows)
    print(f"wrote {out / 'ablation.json'} and {out / 'ablation.png'}")
    return 0


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"schedules on {rows[0]['train_prompts']} training / {rows[0]['heldout_prompts']} held-out "
                        f"prompts, exit layer {rows[0]['exit_layer']}, γ={rows[0]['gamma']}")
    for col in ("schedule", "MAL before", "MAL after", "steps"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["schedule"], f"{r['mal_before']:.3f}", f"{r['mal_after']:.3f}", str(r["steps"]))
    Console(width=100).print(table)
