"""`dvi online`: train the drafter head online from the verifier's decisions, in one process."""
from __future__ import annotations

import json

from dvi.cli.args import add_online_args, online_overrides


def add_parser(sub, name):
    p = sub.add_parser(name, help="train a drafter head online (in-process) and report MAL before/after",
                       description=__doc__)
    add_online_args(p)
    p.add_argument("--schedule", default=None, help="kl_rl (default), kl_only, ce_only, pg_only")
    p.add_argument("--out-dir", default="runs/online", help="head.safetensors, head.json, metrics, plot, summary")
    p.set_defaults(func=run)


def run(args) -> int:
    from dvi.config import load_config
    from dvi.model_checks import check_online
    from selfspec.config import OnlineConfig

    cfg = load_config(OnlineConfig, args.config, {**online_overrides(args), "schedule": args.schedule})
    check_online(cfg)
    from dvi.studies.online import train_and_report
    from selfspec.model import quiet_transformers

    quiet_transformers()
    summary = train_and_report(cfg, args.out_dir)
    print(json.dumps({k: summary[k] for k in ("mal_before", "mal_after", "mal_ngram_only", "mal_after_with_ngram",
                                              "train_prompts", "heldout_prompts",
                                              "steps", "schedule", "exit_layer", "gamma")}, indent=2))
    print(f"head and report in {args.out_dir} (use it with `dvi bench --head-path {args.out_dir}`)")
    return 0
