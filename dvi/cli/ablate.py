"""`dvi ablate`: the same online run under several schedules, on the same prompts; one table and plot."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dvi.common_args import quiet_transformers
from dvi.online_cmd import add_online_args, overrides, train_and_report


def add_parser(sub, name):
    p = sub.add_parser(name, help="compare training schedules (kl_rl, kl_only, ce_only, pg_only) on the same prompts",
                       description=__doc__)
    add_online_args(p)
    p.add_argument("--schedules", default="kl_rl,kl_only,ce_only,pg_only")
    p.add_argument("--out-dir", default="runs/ablate")
    p.set_defaults(func=run)


def run(args) -> int:
    from dvi.config import load_config
    from dvi.model_checks import check_online
    from selfspec.config import OnlineConfig

    base = load_config(OnlineConfig, args.config, overrides(args))
    check_online(base)

    from dvi.plots import plot_mal_curves
    from selfspec.model import load_model

    quiet_transformers()
    out = Path(args.out_dir)
    model, tokenizer = load_model(base.model)
    rows = []
    for name in [s.strip() for s in args.schedules.split(",") if s.strip()]:
        summary = train_and_report(base.model_copy(update={"schedule": name}), out / name, model, tokenizer)
        rows.append(summary)
    table = Table(title=f"schedules on {rows[0]['train_prompts']} training / {rows[0]['heldout_prompts']} held-out "
                        f"prompts, exit layer {rows[0]['exit_layer']}, γ={rows[0]['gamma']}")
    for col in ("schedule", "MAL before", "MAL after", "steps"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["schedule"], f"{r['mal_before']:.3f}", f"{r['mal_after']:.3f}", str(r["steps"]))
    Console(width=100).print(table)
    plot_mal_curves([(r["schedule"], r["curve"]) for r in rows], out / "ablation.png", base.gamma)
    (out / "ablation.json").write_text(json.dumps(
        [{k: r[k] for k in ("schedule", "mal_before", "mal_after", "steps", "train_prompts", "heldout_prompts")}
         for r in rows], indent=2))
    print(f"wrote {out / 'ablation.json'} and {out / 'ablation.png'}")
    return 0
