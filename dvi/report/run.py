"""The report of a `dvi run` directory: `report.md` and `plots/*.png`, from whatever files the run left.

    write_run_report("runs/my_run")  # -> runs/my_run/report.md

The directory is read by `dvi.run.files` (leniently: what exists is rendered, what is missing is named);
config.yaml and trace.jsonl are only linked.
"""
from __future__ import annotations

import json
from bisect import bisect_right
from datetime import datetime, timezone
from pathlib import Path

from dvi.report import plots
from dvi.report.format import mean, md_table, number, percentiles, read_yaml, rolling_mean
from dvi.run import files as rf  # the run directory read leniently

PLOT_FILES = {"heldout_mal": "heldout_mal.png", "live": "live_mal_throughput.png", "learner": "learner.png",
              "latency": "latency_percentiles.png", "head_lag": "head_lag.png", "batching": "batching.png"}
SUMMARY_ROWS = (  # (key, label, kind, core): core keys are named when summary.json lacks them
    ("requests_total", "requests (trace lines)", "int", False),
    ("requests_completed", "requests completed", "int", True),
    ("requests_failed", "requests failed", "int", True),
    ("trace_rejected", "trace lines rejected (never sent)", "int", False),
    ("tokens_generated", "tokens generated", "int", False),
    ("transitions_written", "transitions written", "int", True),
    ("transitions_trained", "transitions trained", "int", True),
    ("transitions_dropped", "transitions dropped", "int", True),
    ("dropped_detail", "dropped, by cause", "counts", False),
    ("transitions_buffered", "transitions buffered (never trained)", "int", True),
    ("deadletter", "dead-lettered", "int", True),
    ("counts_balance", "written = trained + dropped + dead-lettered + buffered", "bool", False),
    ("versions_published", "drafter versions published", "int", True),
    ("versions_held_back", "heads held back by the publish gate", "int", True),
    ("mal_first_window", "held-out MAL, first version (tokens/round)", "float", True),
    ("mal_last_window", "held-out MAL, last version (tokens/round)", "float", True),
    ("heldout_mal_by_version", "held-out MAL by version", "versions", True),
    ("live_mal_first_window", "live MAL, first window (tokens/round)", "float", False),
    ("live_mal_last_window", "live MAL, last window (tokens/round)", "float", False),
    ("window_requests", "requests per window", "int", False),
    ("tokens_per_s_first_window", "decoding tokens/s, first window", "float1", True),
    ("tokens_per_s_last_window", "decoding tokens/s, last window", "float1", True),
    ("tokens_per_s_all", "decoding tokens/s, whole run", "float1", False),
    ("latency_s", "latency (s)", "percentiles", False),
    ("ttft_s", "time to first token (s)", "percentiles", False),
    ("wall_s", "wall time", "seconds", True),
    ("actors", "generation actors", "int", True),
    ("events", "monitor events", "counts", False),
    ("learner_error", "learner error", "text", False),
    ("last_head", "last published head", "code", False),
    ("versions", "package versions", "counts", False),  # selfspec.versions: what the run's speeds depend on
)
CHANGES = (("mal_first_window", "mal_last_window", "held-out MAL change, first → last version"),
           ("live_mal_first_window", "live_mal_last_window", "live MAL change, first → last window"),
           ("tokens_per_s_first_window", "tokens_per_s_last_window", "decoding tokens/s change, first → last window"))
HEADER_KEYS = {"run_id", "started_at", "finished_at", "machine", "host", "hostname", "gpu", "device",
               "workloads"}  # workloads: the per-workload table, from requests.jsonl
LOSS_PREFIX = "losses/"
WEIGHT_KEYS = ("charts/kl_weight", "charts/ce_weight", "charts/pg_weight")
FAILED_SHOWN = 20


# ---------------------------------------------------------------- plots: each returns (file, caption) or a reason


def _plot_heldout(files: rf.RunFiles, out: Path):
    points = {}
    for v in files.versions:
        version, mal = number(v.get("version")), number(v.get("heldout_mal"))
        if version is not None and mal is not None:
            points[int(version)] = mal
    source = "learner/versions.jsonl"
    if not points:
        by_version = (files.summary or {}).get("heldout_mal_by_version") or {}
        for version, mal in by_version.items() if isinstance(by_version, dict) else ():
            if str(version).lstrip("-").isdigit() and number(mal) is not None:
                points[int(version)] = float(mal)
        source = "summary.json heldout_mal_by_version"
    if not points:
        return None, "learner/versions.jsonl has no held-out MAL and summary.json no heldout_mal_by_version"
    pts = sorted(points.items())
    plots.plot_heldout_mal(pts, out)
    first, last = pts[0], pts[-1]
    return out, (f"Held-out mean accepted length of each published drafter version (from {source}): "
                 f"v{first[0]} {first[1]:.3f} → v{last[0]} {last[1]:.3f} over {len(pts)} versions.")


def _plot_live(files: rf.RunFiles, out: Path, events):
    ok = [r for r in files.requests if r.get("ok") and number(r.get("done_s")) is not None
          and number(r.get("mean_accepted_length")) is not None]
    mal, windows = {}, []
    for workload, rs in rf.by_workload(ok).items():
        rs = sorted(rs, key=lambda r: r["done_s"])
        window = rf.rolling_window(len(rs))
        windows.append(window)
        mal[f"{workload} (n={len(rs)}" + (f", mean of last {window})" if window > 1 else ")")] = (
            [r["done_s"] for r in rs], rolling_mean([r["mean_accepted_length"] for r in rs], window))
    snapshots = rf.actors_events(files.metrics)
    overall = rf.series(snapshots, "t", "charts/mean_accepted_length")
    served = rf.series(snapshots, "t", "charts/served_tokens_per_s")
    served_label, served_note = "all actors, per snapshot interval", "from metrics.jsonl actor snapshots"
    if not served[0]:
        served, bin_s = _tokens_per_s_from_requests(files.requests)
        served_label = f"completed tokens per {bin_s:.3g} s bin" if served else served_label
        served_note = f"from requests.jsonl: tokens of requests completed in {bin_s:.3g} s bins"
    if not mal and not overall[0] and not served:
        return None, "no completed requests with a MAL and no actor snapshots in metrics.jsonl"
    plots.plot_live(mal, served if served and served[0] else None, out, overall=overall if overall[0] else None,
                    served_label=served_label, events=events)
    parts = []
    if mal and max(windows) == 1:
        parts.append("top: MAL of each completed request, by completion time")
    elif mal:
        span = f"{min(windows)}–{max(windows)}" if min(windows) != max(windows) else f"{windows[0]}"
        parts.append(f"top: rolling mean of MAL over each workload's last {span} completed requests "
                     "(about a tenth of them), by completion time")
    if overall[0]:
        parts.append("dashed: all actors over each metrics.jsonl snapshot interval")
    if served and served[0]:
        parts.append(f"bottom: served tokens/s ({served_note})")
    return out, "Live MAL and throughput over the run; " + "; ".join(parts) + "."


def _tokens_per_s_from_requests(requests: list[dict]) -> tuple[tuple[list, list] | None, float]:
    done = [(r["done_s"], number(r.get("tokens")) or 0.0) for r in requests
            if r.get("ok") and number(r.get("done_s")) is not None]
    if not done:
        return None, 0.0
    end = max(t for t, _ in done)
    bin_s = max(end / 40, 1.0)
    n = int(end // bin_s) + 1
    totals = [0.0] * n
    for t, tokens in done:
        totals[min(int(t // bin_s), n - 1)] += tokens
    return ([(i + 0.5) * bin_s for i in range(n)], [x / bin_s for x in totals]), bin_s


def _plot_learner(files: rf.RunFiles, out: Path):
    steps: dict[int, dict] = {}  # the last record of each step: after a resume, steps are trained again
    resumes = []
    for record in files.learner:
        step = number(record.get("step"))
        if step is None:
            continue
        if record.get("event") == "resume":
            resumes.append(int(step))
        elif any(k.startswith(LOSS_PREFIX) for k in record):
            steps[int(step)] = record
    if not steps:
        return None, ("no learner/metrics.jsonl" if "learner/metrics.jsonl" in files.missing
                      else "learner/metrics.jsonl has no training steps (no `losses/...` records)")
    ordered = [steps[s] for s in sorted(steps)]
    order = ["losses/kl", "losses/ce", "losses/pg", "losses/total"]
    loss_names = sorted({k for r in ordered for k in r if k.startswith(LOSS_PREFIX)},
                        key=lambda k: (order.index(k) if k in order else len(order), k))
    losses = {k.removeprefix(LOSS_PREFIX): rf.series(ordered, "step", k) for k in loss_names}
    weights = {k.removeprefix("charts/").removesuffix("_weight") + " weight": rf.series(ordered, "step", k)
               for k in WEIGHT_KEYS}
    losses = {k: v for k, v in losses.items() if v[0]}
    weights = {k: v for k, v in weights.items() if v[0]}
    plots.plot_learner(losses, weights, out, resumes=sorted(set(resumes)))
    caption = f"Learner: losses ({', '.join(losses)}) by optimizer step"
    caption += ", and the schedule's loss weights below" if weights else " (no schedule weights logged)"
    if resumes:
        caption += f"; dotted lines: {len(set(resumes))} resume(s) from a checkpoint"
    return out, caption + f"; {len(steps)} steps, last {max(steps)}."


def _plot_latency(files: rf.RunFiles, out: Path):
    ok = [r for r in files.requests if r.get("ok")]
    groups = rf.by_workload(ok)
    if len(groups) > 1:
        groups = {"all": ok, **groups}
    stats = {w: {"latency": percentiles(rf.values(rs, "latency_s")), "TTFT": percentiles(rf.values(rs, "ttft_s"))}
             for w, rs in groups.items()}
    stats = {w: s for w, s in stats.items() if s["latency"] or s["TTFT"]}
    if not stats:
        return None, "no completed requests with a latency"
    plots.plot_latency_percentiles(stats, out)
    return out, ("p50 / p90 / p99 of end-to-end latency (sent → result, actor queue included) and of time to "
                 "first token, per workload, over completed requests.")


def _plot_head_lag(files: rf.RunFiles, out: Path, events):
    snapshots = rf.actors_events(files.metrics)
    lag = rf.series(snapshots, "t", "charts/head_lag")
    if lag[0]:
        plots.plot_over_time([{"label": "largest lag over actors", "t": lag[0], "y": lag[1]}], out, events=events)
        return out, ("Policy lag: how many published versions the most out-of-date actor's drafter head is behind "
                     "the latest (metrics.jsonl actor snapshots).")
    timeline = rf.version_timeline(files)
    served = [(r["done_s"], number(rf.extra(r).get("head_version")), rf.workload(r))
              for r in files.requests if number(r.get("done_s")) is not None]
    served = [(t, v, w) for t, v, w in served if v is not None]
    if not served:
        return None, "no head_lag in metrics.jsonl and no requests with extra.head_version"
    series = []
    if timeline:
        times, latest = timeline[0]
        for workload in sorted({w for _, _, w in served}):
            # a head newer than the last `latest` seen: the timeline had not caught up yet, lag 0
            pts = [(t, max(latest[i - 1] - v, 0)) for t, v, w in served if w == workload
                   and (i := bisect_right(times, t)) > 0]
            if pts:
                series.append({"label": workload, "t": [t for t, _ in pts], "y": [y for _, y in pts],
                               "points": True, "jitter": 0.12})
    if series:
        plots.plot_over_time(series, out, events=events)
        return out, (f"Policy lag per request: the latest published version at its completion ({timeline[1]}) "
                     "minus the head version it was served with (points jittered ±0.12 vertically to show "
                     "how many share a value).")
    for workload in sorted({w for _, _, w in served}):
        pts = [(t, v) for t, v, w in served if w == workload]
        series.append({"label": workload, "t": [t for t, _ in pts], "y": [y for _, y in pts], "points": True})
    plots.plot_over_time(series, out, ylabel="head version served", events=events,
                          title="ModelParts head version served per request")
    return out, ("Head version each request was served with (the lag itself is unknown: no head_lag or versions "
                 "events in metrics.jsonl, and no run start time to place versions.jsonl on the replay clock).")


def _plot_batching(files: rf.RunFiles, out: Path, events):
    snapshots = rf.actors_events(files.metrics)
    series = [{"label": label, "t": t, "y": y} for label, (t, y) in (
        ("sequences per round (over each snapshot interval)", rf.series(snapshots, "t", "charts/batch_size")),
        ("requests waiting for a place in a batch (all actors)", rf.series(snapshots, "t", "charts/queue_depth")))
        if t]
    caption = ("Continuous batching: how many sequences the actors' rounds decoded together, and how many "
               "requests waited for a place (metrics.jsonl actor snapshots).")
    if not series:
        done = [(r["done_s"], number(rf.extra(r).get("mean_batch_size"))) for r in files.requests
                if number(r.get("done_s")) is not None]
        done = [(t, b) for t, b in done if b is not None]
        if not done:
            return None, "no charts/batch_size in metrics.jsonl and no requests with extra.mean_batch_size"
        series = [{"label": "each request", "t": [t for t, _ in done], "y": [b for _, b in done], "points": True}]
        caption = "Mean batch size each request was decoded in, by completion time (requests.jsonl)."
    plots.plot_over_time(series, out, ylabel="sequences / requests", events=events,
                         title="Batch size and queue of the generation actors")
    return out, caption


# ---------------------------------------------------------------- markdown


def _fmt(value, kind: str = "auto") -> str:
    if value is None:
        return "—"
    if kind == "versions" and isinstance(value, dict):
        pts = sorted((int(k), number(v)) for k, v in value.items() if str(k).lstrip("-").isdigit())
        pts = [(k, v) for k, v in pts if v is not None]
        if not pts:
            return "—"
        return f"v{pts[0][0]} {pts[0][1]:.3f} → v{pts[-1][0]} {pts[-1][1]:.3f} ({len(pts)} versions)"
    if kind == "percentiles" and isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v, 'float')}" for k, v in value.items())
    if kind == "counts" and isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in value.items()) or "none"
    if kind == "seconds" and number(value) is not None:
        s = float(value)
        return f"{s:.1f} s" + (f" ({int(s // 60)} min {s % 60:.0f} s)" if s >= 60 else "")
    if kind == "code" and isinstance(value, str):
        return f"`{value}`"
    if kind == "text" and isinstance(value, str):
        return _short(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or (kind == "int" and number(value) is not None and float(value).is_integer()):
        return f"{int(value):,}"
    if isinstance(value, float):
        digits = {"float": 3, "float1": 1}.get(kind)
        return f"{value:.{digits}f}" if digits is not None else f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return _short(json.dumps(value), 100)
    return _short(str(value))


def _utc(value) -> str:
    """Unix time as UTC text; anything else as it is."""
    if number(value) is None:
        return str(value)
    try:
        return datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return str(value)


def _when(files: rf.RunFiles) -> str:
    summary = files.summary or {}
    if summary.get("started_at"):
        return _utc(summary["started_at"]) + (f" → {_utc(summary['finished_at'])}" if summary.get("finished_at")
                                              else "")
    written = [p.stat().st_mtime for p in (files.dir / "summary.json", files.dir / "requests.jsonl") if p.is_file()]
    return f"files last written {_utc(max(written))}"


def _machine(summary: dict) -> str | None:
    parts = [summary.get(k) for k in ("machine", "host", "hostname", "gpu", "device") if summary.get(k)]
    return ", ".join(p if isinstance(p, str) else json.dumps(p) for p in parts) or None


def _run_id(files: rf.RunFiles) -> str:
    summary = files.summary or {}
    if summary.get("run_id"):
        return str(summary["run_id"])
    run_id = read_yaml(files.dir / "config.yaml").get("run_id")  # a broken config is only linked
    return str(run_id) if run_id else files.dir.resolve().name


def _summary_section(files: rf.RunFiles) -> list[str]:
    if files.summary is None:
        return ["## Summary", "", "_No summary.json (the run did not finish?): numbers below come from "
                "requests.jsonl alone._", "", *md_table(["", "value"], _summary_from_requests(files.requests)), ""]
    s = files.summary
    rows, absent = [], [key for key, _, _, core in SUMMARY_ROWS if core and key not in s]
    changes = {last: (first, label) for first, last, label in CHANGES}
    for key, label, kind, core in SUMMARY_ROWS:
        if core or key in s:
            rows.append([label, _fmt(s.get(key), kind)])
        if key in changes:  # right under the pair it compares
            a, b = number(s.get(changes[key][0])), number(s.get(key))
            if a is not None and b is not None:
                rows.append([changes[key][1], f"{b - a:+.3f}" + (f" ({(b / a - 1) * 100:+.1f}%)" if a else "")])
    known = {key for key, *_ in SUMMARY_ROWS} | HEADER_KEYS
    rows += [[f"`{k}`", _fmt(v)] for k, v in s.items() if k not in known]
    lines = ["## Summary", "", *md_table(["", "value"], rows), ""]
    if absent:
        lines += [f"_Not in summary.json: {', '.join(f'`{k}`' for k in absent)}._", ""]
    return lines


def _summary_from_requests(requests: list[dict]) -> list[list]:
    ok = [r for r in requests if r.get("ok")]
    ends = rf.values(requests, "done_s")
    return [["requests completed", f"{len(ok):,}"], ["requests failed", f"{len(requests) - len(ok):,}"],
            ["mean MAL (completed requests)", _fmt(mean(rf.values(ok, "mean_accepted_length")), "float")],
            ["last request done at", _fmt(max(ends), "seconds") if ends else "—"]]


def _workload_section(files: rf.RunFiles) -> list[str]:
    if not files.requests:
        return []
    groups = rf.by_workload(files.requests)
    if len(groups) > 1:
        groups = {**groups, "**all**": files.requests}
    rows = []
    for workload, rs in groups.items():
        ok = [r for r in rs if r.get("ok")]
        lat, ttft = percentiles(rf.values(ok, "latency_s")), percentiles(rf.values(ok, "ttft_s"))
        rows.append([workload, len(rs), len(ok), len(rs) - len(ok),
                     _fmt(mean(rf.values(ok, "mean_accepted_length")), "float"),
                     _fmt(mean(rf.values(ok, "tokens_per_s")), "float1"),
                     _fmt(lat[0], "float") if lat else "—", _fmt(ttft[0], "float") if ttft else "—"])
    return ["## Per workload", "", *md_table(["workload", "requests", "ok", "failed", "mean MAL (tokens/round)",
                                           "mean tokens/s", "p50 latency (s)", "p50 TTFT (s)"], rows), ""]


def _failed_section(files: rf.RunFiles) -> list[str]:
    failed = [r for r in files.requests if not r.get("ok")]
    if not files.requests:
        return []
    if not failed:
        return ["## Failed requests", "", "None.", ""]
    shown = failed[:FAILED_SHOWN]
    rows = [[r.get("request_id"), rf.workload(r), _fmt(number(r.get("done_s")), "float1"),
             _short(r.get("error") or "(no error message)")] for r in shown]
    more = f" (the first {len(shown)})" if len(failed) > len(shown) else ""
    return [f"## Failed requests: {len(failed)} of {len(files.requests)}{more}", "",
            *md_table(["request", "workload", "done at (s)", "error"], rows), ""]


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _event_detail(event: dict) -> str:
    if event.get("detail") is not None:
        return _fmt(event["detail"])
    rest = {k: v for k, v in event.items() if k not in ("t", "step", "event")}
    return ", ".join(f"{k} {_fmt(v)}" for k, v in rest.items())


def _events_section(files: rf.RunFiles) -> list[str]:
    restarts = rf.restarts(files.metrics)
    if not restarts:
        return [] if "metrics.jsonl" in files.missing else ["## Restarts", "", "None recorded in metrics.jsonl.", ""]
    rows = [[_fmt(number(e.get("t")), "float1"), e.get("event"), _short(_event_detail(e), 160)]
            for e in restarts[:FAILED_SHOWN]]
    counts = ", ".join(f"{k.replace('_', ' ')} × {sum(e['event'] == k for e in restarts)}"
                       for k in rf.RESTARTS if any(e["event"] == k for e in restarts))
    more = f" (the first {FAILED_SHOWN})" if len(restarts) > FAILED_SHOWN else ""
    return [f"## Restarts: {counts}{more}", "", *md_table(["t (s)", "event", "detail"], rows), ""]


def write_run_report(run_dir: str | Path) -> Path:
    """Write `report.md` and `plots/*.png` into `run_dir` from what it holds; returns the report's path.
    Raises FileNotFoundError if `run_dir` has neither summary.json nor requests.jsonl. A `dvi drift` study
    directory (arms/ and trace.jsonl, no requests.jsonl) gets the study's report (dvi/report/drift.py)."""
    if (Path(run_dir) / "arms").is_dir() and not (Path(run_dir) / "requests.jsonl").exists():
        from dvi.report.drift import is_drift_dir, write_drift_report

        if is_drift_dir(run_dir):
            return write_drift_report(run_dir)
    files = rf.load_run(run_dir)
    plot_dir = files.dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    events = [(float(e["t"]), e["event"]) for e in rf.restarts(files.metrics) if number(e.get("t")) is not None]
    makers = [("Held-out MAL by version", "heldout_mal", lambda out: _plot_heldout(files, out)),
              ("Live MAL and served throughput", "live", lambda out: _plot_live(files, out, events)),
              ("Learner losses and schedule", "learner", lambda out: _plot_learner(files, out)),
              ("Latency percentiles", "latency", lambda out: _plot_latency(files, out)),
              ("Head lag", "head_lag", lambda out: _plot_head_lag(files, out, events)),
              ("Batching", "batching", lambda out: _plot_batching(files, out, events))]
    plot_lines = ["## Plots", ""]
    for i, (title, key, make) in enumerate(makers, 1):
        out = plot_dir / PLOT_FILES[key]
        out.unlink(missing_ok=True)  # no stale plot from an earlier report of this directory
        try:
            file, caption = make(out)
        except Exception as err:  # one plot that cannot be drawn from odd data never costs the whole report
            out.unlink(missing_ok=True)
            file, caption = None, f"plotting failed ({type(err).__name__}: {_short(str(err), 160)})"
        plot_lines.append(f"### {i}. {title}")
        plot_lines.append("")
        if file is None:
            plot_lines.append(f"_Not plotted: {caption}._")
        else:
            plot_lines += [f"![{title}](plots/{file.name})", "", f"_{caption}_"]
        plot_lines.append("")

    summary = files.summary or {}
    header = [f"# Run report: {_run_id(files)}", "",
              f"- **when**: {_when(files)}"]
    if _machine(summary):
        header.append(f"- **machine**: {_machine(summary)}")
    header.append("- **files**: " + ", ".join(
        f"[{name}]({name})" if name not in files.missing else f"{name} (missing)"
        for name in ("config.yaml", "trace.jsonl", "summary.json", "requests.jsonl", "metrics.jsonl",
                     "learner/metrics.jsonl", "learner/versions.jsonl")))
    if files.missing:
        header.append("- **missing**: " + ", ".join(f"`{m}`" for m in files.missing))
    header += [f"- **problem**: {p}" for p in files.problems]
    header.append("")

    lines = [*header, *_summary_section(files), *plot_lines, *_workload_section(files), *_failed_section(files),
             *_events_section(files), "_Regenerate with `dvi report " + str(run_dir) + "`._", ""]
    report = files.dir / "report.md"
    report.write_text("\n".join(lines))
    return report
