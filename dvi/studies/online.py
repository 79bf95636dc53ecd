"""Training the drafter head online in one process (selfspec.online), and writing what it did: `dvi online`
(one schedule), `dvi ablate` (several on the same prompts) and the drift study's offline head."""
from __future__ import annotations

import json
from pathlib import Path

ABLATION_KEYS = ("schedule", "mal_before", "mal_after", "steps", "train_prompts", "heldout_prompts")


def train_and_report(cfg, out_dir, model=None, tokenizer=None) -> dict:
    """Run the online loop and write its run directory: head.safetensors + head.json, metrics.jsonl,
    TensorBoard events under tb/, mal.png and summary.json."""
    from dvi.report.plots import plot_mal_curves
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


def ablate(base, schedules: list[str], out_dir) -> list[dict]:
    """`base` trained under each schedule in turn on one loaded model, each into out_dir/<schedule>; writes
    out_dir/ablation.json (ABLATION_KEYS per schedule) and ablation.png. Returns each run's summary."""
    from dvi.report.plots import plot_mal_curves
    from selfspec.model import load_model

    out = Path(out_dir)
    model, tokenizer = load_model(base.model)
    rows = [train_and_report(base.model_copy(update={"schedule": name}), out / name, model, tokenizer)
            for name in schedules]
    plot_mal_curves([(r["schedule"], r["curve"]) for r in rows], out / "ablation.png", base.gamma)
    (out / "ablation.json").write_text(json.dumps([{k: r[k] for k in ABLATION_KEYS} for r in rows], indent=2))
    return rows
