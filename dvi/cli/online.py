"""`dvi online`: train the drafter head online from the verifier's decisions, in one process."""
from __future__ import annotations

import json
from pathlib import Path

from dvi.common_args import add_device_args, quiet_transformers


def add_online_args(p) -> None:
    p.add_argument("--config", default=None, help="YAML config (see configs/online.yaml); flags below override it")
    p.add_argument("--model", default=None)
    p.add_argument("--workload", default=None, help="builtin, humaneval, spec-bench, or a Spec-Bench-format JSONL path")
    p.add_argument("--train-prompts", type=int, default=None)
    p.add_argument("--heldout-prompts", type=int, default=None, help="from the end of the workload, never trained on")
    p.add_argument("--exit-layer", "-k", type=int, default=None)
    p.add_argument("--gamma", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    add_device_args(p, dtype_default=None)  # None: the config's dtype stands
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, dotted for nested ones (YAML value), e.g. "
                        "--set head.attention_layers=1 --set head.context_window=16; repeatable")


def overrides(args) -> dict:
    from dvi.config import cli_overrides

    flags = {"model": args.model, "workload": args.workload, "train_prompts": args.train_prompts,
             "heldout_prompts": args.heldout_prompts, "exit_layer": args.exit_layer, "gamma": args.gamma,
             "lr": args.lr, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
             "device": args.device, "dtype": args.dtype}
    return cli_overrides(args.set, flags, "head.draft_vocab=8192")


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

    cfg = load_config(OnlineConfig, args.config, {**overrides(args), "schedule": args.schedule})
    check_online(cfg)
    quiet_transformers()
    summary = train_and_report(cfg, args.out_dir)
    print(json.dumps({k: summary[k] for k in ("mal_before", "mal_after", "mal_ngram_only", "mal_after_with_ngram",
                                              "train_prompts", "heldout_prompts",
                                              "steps", "schedule", "exit_layer", "gamma")}, indent=2))
    print(f"head and report in {args.out_dir} (use it with `dvi bench --drafter {args.out_dir}`)")
    return 0


def train_and_report(cfg, out_dir, model=None, tokenizer=None) -> dict:
    """Run the online loop and write its run directory: head.safetensors + head.json, metrics.jsonl,
    TensorBoard events under tb/, mal.png and summary.json."""
    from dvi.plots import plot_mal_curves
    from learner.metrics_log import MetricsLog
    from selfspec.drafter import save_head
    from selfspec.online import run_online

    out = Path(out_dir)
    with MetricsLog(out) as log:
        head, summary = run_online(cfg, model, tokenizer, log)
    save_head(head, out, {"base_model": cfg.model, "version": summary["head_versions"],
                          "training": {k: summary[k] for k in ("mal_before", "mal_after", "train_prompts", "steps",
                                                               "schedule")}})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_mal_curves([(cfg.schedule, summary["curve"])], out / "mal.png", cfg.gamma)
    return summary
