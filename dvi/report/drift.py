"""The report of a `dvi drift` study directory: `report.md` and `plots/*.png`, from its files alone.

    write_drift_report("runs/drift")   # -> runs/drift/report.md (also `dvi report runs/drift`)

Read: trace.jsonl (the phases), arms/<arm>/requests.jsonl and summary.json, config.yaml (the study's
recovery_fraction, plateau_fraction, rolling and arms; defaults when it is missing). An arm that did not
run, or stopped early, is named and reported with what it left.
"""
from __future__ import annotations

from pathlib import Path

from dvi.report import plots
from dvi.report.format import DASH, fixed, md_cell, md_table, read_json
from dvi.studies.drift_analysis import study_settings, summarize_study

PLOT_FILES = {"mal": "drift_mal.png", "phases": "drift_phases.png"}


def is_drift_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "arms").is_dir() and (path / "trace.jsonl").is_file()


def _recovery_cell(arm: dict, p: int) -> str:
    if p == 0:
        return "— (first phase)"
    n = (arm.get("recovery_requests") or [None] * p)[p - 1]
    s = (arm.get("recovery_seconds") or [None] * p)[p - 1]
    if n is None:
        return "never"
    return f"{n} req" + (f" ({s:.1f} s)" if s is not None else "")


def write_drift_report(drift_dir: str | Path, summary: dict | None = None) -> Path:
    """Write report.md and plots/ into a study directory; returns the report's path. `summary`: the one
    just computed (else it is computed from the files). Raises FileNotFoundError without trace.jsonl."""
    drift_dir = Path(drift_dir)
    settings = study_settings(drift_dir)
    fresh, analyses = summarize_study(drift_dir, settings)
    summary = summary if summary is not None else read_json(drift_dir / "summary.json")
    summary = {**fresh, **{k: v for k, v in (summary or {}).items() if k not in fresh}}
    phases, arms = summary["phases"], summary["arms"]
    plot_dir = drift_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    lines = [f"# Drift study: {drift_dir.resolve().name}", "",
             "- **phases** (trace order): " + " → ".join(f"{w} ({n} requests)"
                                                         for w, n in zip(phases, summary["phase_requests"])),
             "- **arms**: " + ", ".join(f"`{a}`" + (f" ({arms[a]['missing']})" if arms[a].get("missing") else "")
                                        for a in arms),
             f"- **recovery**: after a shift, the number of the new phase's completed requests until the rolling "
             f"MAL ({settings['rolling']} requests, within the phase) first reaches "
             f"{settings['recovery_fraction']:g} × the previous phase's plateau (mean MAL of its last "
             f"{settings['plateau_fraction']:.0%} of completed requests); seconds from the shift (first request "
             "of the phase sent) to that request's completion",
             "- **files**: [config.yaml](config.yaml), [trace.jsonl](trace.jsonl), [summary.json](summary.json); "
             "each arm's run directory and its own report under `arms/<arm>/`", ""]
    if summary.get("arms_failed"):
        failed = summary["arms_failed"].items()
        lines += ["**Failed arms**: " + "; ".join(f"`{a}`: {md_cell(e, '')}" for a, e in failed), ""]

    lines += ["## Plots", ""]
    for key, title, make in (("mal", "Live MAL across the shifts", _plot_mal),
                             ("phases", "MAL and decoding speed per phase", _plot_phases)):
        out = plot_dir / PLOT_FILES[key]
        out.unlink(missing_ok=True)
        try:
            caption = make(out, summary, analyses, settings)
        except Exception as err:  # a plot that cannot be drawn never costs the report
            out.unlink(missing_ok=True)
            caption = f"plotting failed ({type(err).__name__}: {err})"
        lines.append(f"### {title}")
        lines.append("")
        lines += [f"![{title}](plots/{out.name})", ""] if out.is_file() else []
        lines += [f"_{caption}_", ""]

    lines += ["## Per arm and phase", ""]
    rows = []
    for arm, entry in arms.items():
        if entry.get("missing"):
            rows.append([f"`{arm}`", "—", "—", "—", "—", entry["missing"]])
            continue
        for p, workload in enumerate(phases):
            rows.append([f"`{arm}`" if p == 0 else "", f"{p + 1}. {workload}",
                         f"{entry['phase_completed'][p]}/{summary['phase_requests'][p]}",
                         fixed(entry["phase_mal"][p], 3, DASH), fixed(entry["phase_tokens_per_s"][p], 1, DASH),
                         _recovery_cell(entry, p)])
    lines += md_table(["arm", "phase", "completed", "MAL (tokens/round)", "decoding tokens/s", "recovery"], rows, "")
    lines.append("")
    learned = {a: e for a, e in arms.items() if e.get("heldout_mal_last") is not None}
    if learned:
        lines += ["## Held-out MAL of the learning arms", "",
                  *md_table(["arm", "first version", "last version"],
                            [[f"`{a}`", fixed(e.get("heldout_mal_first"), 3, DASH),
                              fixed(e.get("heldout_mal_last"), 3, DASH)] for a, e in learned.items()], ""), ""]
    lines += [f"_Regenerate with `dvi report {drift_dir}` (or `dvi drift --report-only {drift_dir}`)._", ""]
    report = drift_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


def _plot_mal(out: Path, summary: dict, analyses: dict, settings: dict) -> str:
    if not any(a.curve()[0] for a in analyses.values()):
        raise ValueError("no arm has completed requests with a MAL")
    starts, names = [], []
    total = 0
    for workload, n in zip(summary["phases"], summary["phase_requests"]):
        starts.append(total)
        names.append(workload)
        total += n
    plots.plot_drift_mal({arm: a.curve() for arm, a in analyses.items()}, list(zip(starts, names)), total, out,
                         rolling=settings["rolling"],
                         recoveries={arm: a.recovery_points() for arm, a in analyses.items()})
    return (f"Rolling mean of the live MAL over the last {settings['rolling']} completed requests of the same "
            "phase (it restarts at each shift), by position in the trace (a phase's completed requests in "
            "completion order); dotted lines: the shifts; circles: where each arm recovered.")


def _plot_phases(out: Path, summary: dict, analyses: dict, settings: dict) -> str:
    arms = {a: e for a, e in summary["arms"].items() if not e.get("missing")}
    if not arms:
        raise ValueError("no arm has a requests.jsonl")
    plots.plot_drift_phases(summary["phases"], [
        ("Mean accepted length per phase", "MAL (tokens/round)", {a: e["phase_mal"] for a, e in arms.items()},
         "{:.2f}"),
        ("Decoding speed per phase", "decoding tokens/s", {a: e["phase_tokens_per_s"] for a, e in arms.items()},
         "{:.1f}")],
        out)
    return ("Top: mean live MAL of each phase's completed requests; bottom: their tokens over the seconds actors "
            "spent decoding them.")
