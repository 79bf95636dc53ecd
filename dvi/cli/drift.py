"""`dvi drift`: a drift study. The same trace, whose workload shifts (chat → code → math → translation),
served by four arms one after another, each a whole `dvi run`: the untrained head frozen, a head trained
offline on the first phase frozen, and learning online with kl_only and with kl_rl.

    dvi drift --config configs/drift.yaml                       # all arms, into runs/drift
    dvi drift --config configs/drift.yaml --arms online_kl,online_kl_rl --set trace.make.n=48
    dvi drift --config runs/drift/config.yaml --resume          # run the arms a stopped study lacks
    dvi drift --report-only runs/drift                          # rewrite report.md (or: dvi report runs/drift)

Per arm and phase it reports the live MAL, decoding tokens/s and, after each shift, how many requests (and
seconds) the rolling MAL takes to recover to recovery_fraction of the previous phase's plateau:
summary.json, report.md with plots, and a table at the end. On a Ray cluster the arms could run side by
side; here they run in sequence.
"""
from __future__ import annotations

import argparse


def add_parser(sub, name):
    p = sub.add_parser(name, help="a drift study: frozen, offline-trained and online-learning heads on a "
                                  "shifting trace",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="study config YAML (default: configs/drift.yaml; with --resume "
                                                  "and --out-dir: that directory's config.yaml)")
    p.add_argument("--out-dir", default=None, help="the study directory (out_dir)")
    p.add_argument("--arms", default=None, help="comma-separated subset of the config's arms, e.g. "
                                                "online_kl,online_kl_rl")
    p.add_argument("--overwrite", action="store_true", help="replace an existing study directory")
    p.add_argument("--resume", action="store_true", help="keep the study directory's trace and offline head; "
                                                         "skip arms that finished")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    p.add_argument("--report-only", metavar="DIR", default=None, help="only rewrite DIR's report.md and plots")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, dotted for nested ones (YAML value), e.g. --set rolling=6")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from dvi.config import cli_overrides, load_config
    from dvi.errors import UserError
    from dvi.model_checks import check_drift
    from dvi.report.drift import write_drift_report
    from dvi.report.format import read_json
    from dvi.studies.drift import run_drift
    from dvi.studies.drift_config import DriftConfig

    if args.report_only:
        summary_file = Path(args.report_only) / "summary.json"
        report = write_drift_report(args.report_only, read_json(summary_file))
        print_table(read_json(summary_file) or _fresh(args.report_only))
        print(f"report: {report}")
        return 0
    config = args.config
    if config is None:
        resumed = Path(args.out_dir or "") / "config.yaml"
        config = str(resumed) if args.resume and args.out_dir and resumed.is_file() else "configs/drift.yaml"
    cfg = load_config(DriftConfig, config, cli_overrides(args.set, {"out_dir": args.out_dir}, "rolling=6"))
    check_drift(cfg)  # every arm's values against the model, before the first arm starts
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    try:
        drift_dir, summary = run_drift(cfg, arms=arms, overwrite=args.overwrite, resume=args.resume,
                                       progress=not args.no_progress)
    except FileExistsError as err:
        raise UserError(str(err)) from None
    print_table(summary)
    print(f"study directory: {drift_dir}  (summary.json, arms/<arm>/, offline/)")
    print(f"report: {drift_dir / 'report.md'}")
    return 1 if summary.get("arms_failed") else 0


def _fresh(drift_dir) -> dict:
    from dvi.studies.drift_analysis import summarize_study

    return summarize_study(drift_dir)[0]


def print_table(summary: dict) -> None:
    """One row per arm and phase: live MAL, decoding tokens/s, the recovery after the shift into the phase."""
    from rich.console import Console
    from rich.table import Table

    from dvi.report.format import DASH, fixed

    phases = summary.get("phases") or []
    table = Table(title="dvi drift: per arm and phase", show_header=True,
                  caption="recovery: requests (seconds) until the rolling MAL reached the target after the shift "
                          "into the phase")
    for name, justify in (("arm", "left"), ("phase", "left"), ("MAL", "right"), ("tokens/s", "right"),
                          ("recovery", "right"), ("held-out MAL", "right")):
        table.add_column(name, justify=justify, no_wrap=name in ("arm", "phase"))
    for arm, entry in (summary.get("arms") or {}).items():
        if entry.get("missing"):
            table.add_row(arm, entry["missing"], "", "", "", "", end_section=True)
            continue
        for p, workload in enumerate(phases):
            recovered = "—"
            if p:
                n, s = entry["recovery_requests"][p - 1], entry["recovery_seconds"][p - 1]
                recovered = "never" if n is None else f"{n}" + (f" ({s:.1f} s)" if s is not None else "")
            table.add_row(arm if p == 0 else "", f"{p + 1}. {workload}", fixed(entry["phase_mal"][p], 3, DASH),
                          fixed(entry["phase_tokens_per_s"][p], 1, DASH), recovered,
                          fixed(entry.get("heldout_mal_last"), 3, DASH) if p == 0 else "",
                          end_section=p == len(phases) - 1)
    Console().print(table)
    if summary.get("arms_failed"):
        for arm, error in summary["arms_failed"].items():
            print(f"arm {arm} failed: {error}")
