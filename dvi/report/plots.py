"""PNG plots for run reports (matplotlib, headless): `dvi online`'s MAL curves and the plots of a
`dvi run` directory's report (dvi/report/run.py) and of a drift study's (dvi/report/drift.py)."""
from __future__ import annotations

from pathlib import Path

from dvi.report.format import PERCENTILES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_mal_curves(curves: list[tuple[str, list[dict]]], file: Path, gamma: int) -> None:
    """Held-out mean accepted length against training prompts seen, one line per labelled curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves:
        ax.plot([c["prompts"] for c in curve], [c["mal_heldout"] for c in curve], marker="o", label=label)
    ax.set_title("drafter head learning online")
    ax.set_xlabel("training prompts seen")
    ax.set_ylabel(f"mean accepted length, held-out (γ={gamma})")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, file)


# ---------------------------------------------------------------- run reports (dvi report RUN_DIR)

EVENT_STYLES = {"actor_restart": ("tab:red", "actor restart"), "learner_restart": ("tab:purple", "learner restart"),
                "redis_restart": ("tab:brown", "Redis restart"), "learner_failed": ("black", "learner failed")}


def _save(fig, file: Path) -> None:
    plt = _pyplot()
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def time_unit(max_s: float) -> tuple[float, str]:
    """Seconds for runs up to 20 minutes, minutes beyond: (divisor, unit)."""
    return (60.0, "min") if max_s > 1200 else (1.0, "s")


def _mark_events(ax, events: list[tuple[float, str]], scale: float) -> None:
    """Vertical dotted lines at restarts, one legend entry per kind."""
    labelled = set()
    for t, kind in events:
        color, label = EVENT_STYLES.get(kind, ("0.4", kind))
        ax.axvline(t / scale, color=color, ls=":", lw=1.2, label=None if kind in labelled else label)
        labelled.add(kind)


def _legend(ax, outside: bool = True) -> None:
    """A legend (if anything is labelled), by default right of the axes so it never hides a line."""
    handles, _ = ax.get_legend_handles_labels()
    if handles and outside:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, markerscale=1.5)
    elif handles:
        ax.legend(fontsize=8, loc="best")


LOSS_COLORS = {"kl": "tab:blue", "ce": "tab:orange", "pg": "tab:green", "total": "0.15"}


def plot_heldout_mal(points: list[tuple[int, float]], file: Path) -> None:
    """Held-out mean accepted length of each published drafter version; first and last annotated."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs, ys = [v for v, _ in points], [m for _, m in points]
    ax.plot(xs, ys, marker="o", ms=4 if len(xs) <= 40 else 2, color="tab:blue", label="held-out MAL")
    ax.axhline(ys[0], color="0.5", ls="--", lw=1, label=f"first version (v{xs[0]})")
    box = {"boxstyle": "round,pad=0.2", "fc": "white", "ec": "0.8", "alpha": 0.9}
    ax.annotate(f"v{xs[0]}: {ys[0]:.3f}", (xs[0], ys[0]), textcoords="offset points", xytext=(6, -14),
                ha="left", fontsize=8, bbox=box)
    if len(xs) > 1:
        ax.annotate(f"v{xs[-1]}: {ys[-1]:.3f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(-6, 10),
                    ha="right", fontsize=8, bbox=box)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Held-out MAL by published drafter version")
    ax.set_xlabel("published version")
    ax.set_ylabel("mean accepted length (tokens/round)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(y=0.18)
    ax.grid(alpha=0.3)
    _save(fig, file)


def plot_live(mal: dict[str, tuple[list, list]], served: tuple[list, list] | None, file: Path, *,
              overall: tuple[list, list] | None = None, served_label: str = "served tokens/s",
              events: list[tuple[float, str]] = ()) -> None:
    """Top: live MAL per workload (curves already smoothed) and optionally all actors' interval MAL;
    bottom: served tokens/s. Either panel may be empty (then it is left out)."""
    plt = _pyplot()
    panels = [p for p in ("mal", "served") if (p == "mal" and (mal or overall)) or (p == "served" and served)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), sharex=True, squeeze=False)
    axes = dict(zip(panels, axes[:, 0]))
    every_t = [t for ts, _ in mal.values() for t in ts] + list((overall or ([], []))[0]) + list((served or ([], []))[0])
    scale, unit = time_unit(max(every_t, default=0))
    if "mal" in axes:
        ax = axes["mal"]
        for label, (ts, ys) in mal.items():
            ax.plot([t / scale for t in ts], ys, lw=1.5, label=label, marker="o" if len(ts) < 30 else None, ms=3)
        if overall:
            ax.plot([t / scale for t in overall[0]], overall[1], color="0.35", ls="--", lw=1,
                    label="all actors (snapshot intervals)")
        _mark_events(ax, events, scale)
        ax.set_title("Live mean accepted length per workload")
        ax.set_ylabel("mean accepted length\n(tokens/round)")
        ax.grid(alpha=0.3)
        _legend(ax)
    if "served" in axes:
        ax = axes["served"]
        ax.plot([t / scale for t in served[0]], served[1], color="0.15", lw=1.5, label=served_label,
                marker="o" if len(served[0]) < 30 else None, ms=3)
        _mark_events(ax, events, scale)
        ax.set_title("Served throughput")
        ax.set_ylabel("tokens/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        _legend(ax)
    axes[panels[-1]].set_xlabel(f"time since replay start ({unit})")
    _save(fig, file)


def plot_learner(losses: dict[str, tuple[list, list]], weights: dict[str, tuple[list, list]], file: Path, *,
                 resumes: list[int] = ()) -> None:
    """Top: training losses by optimizer step; bottom: the schedule's loss weights. Resumes marked."""
    plt = _pyplot()
    panels = [(name, series) for name, series in (("losses", losses), ("weights", weights)) if series]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), sharex=True, squeeze=False)
    for ax, (name, series) in zip(axes[:, 0], panels):
        for label, (steps, ys) in series.items():
            color = LOSS_COLORS.get(label.split()[0])  # a loss and its weight share a colour
            ax.plot(steps, ys, lw=1.2, label=label, color=color, marker="." if len(steps) < 30 else None)
        for i, step in enumerate(resumes):
            ax.axvline(step, color="tab:purple", ls=":", lw=1.2, label="learner resumed" if i == 0 else None)
        ax.grid(alpha=0.3)
        _legend(ax)
        if name == "losses":
            ax.set_title("Learner losses")
            ax.set_ylabel("loss (mean per position)")
            ax.axhline(0, color="0.6", lw=0.8)
        else:
            ax.set_title("Loss weights (schedule)")
            ax.set_ylabel("weight")
    axes[-1, 0].set_xlabel("optimizer step")
    _save(fig, file)


def plot_latency_percentiles(stats: dict[str, dict[str, list[float | None]]], file: Path) -> None:
    """Grouped bars: p50/p90/p99 per workload, one panel per metric (stats[workload][metric] = 3 values)."""
    import numpy as np

    plt = _pyplot()
    metrics = [m for m in ("latency", "TTFT") if any(s.get(m) for s in stats.values())]
    groups = list(stats)
    if len(groups) <= 5:  # side by side
        fig, axes = plt.subplots(1, len(metrics), figsize=(max(7, 1.4 * len(groups) * len(metrics) + 2), 4),
                                 squeeze=False)
        axes = axes[0]
    else:  # one above the other, each as wide as its workloads need
        fig, axes = plt.subplots(len(metrics), 1, figsize=(min(16, max(8, 0.9 * len(groups) + 2)),
                                                           3.6 * len(metrics)), squeeze=False)
        axes = axes[:, 0]
    x, width = np.arange(len(groups)), 0.8 / len(PERCENTILES)
    colors = ("tab:blue", "tab:orange", "tab:red")
    for ax, metric in zip(axes, metrics):
        for i, (p, color) in enumerate(zip(PERCENTILES, colors)):
            ys = [(stats[g].get(metric) or [None] * len(PERCENTILES))[i] for g in groups]
            bars = ax.bar(x + (i - 1) * width, [np.nan if y is None else y for y in ys], width, label=f"p{p}",
                          color=color)
            if len(groups) <= 6:
                ax.bar_label(bars, labels=["" if y is None else f"{y:.2g}" for y in ys], fontsize=7, padding=1)
        ax.set_xticks(x, groups)
        if max(map(len, groups)) * len(groups) > 60:  # long names: slanted, anchored at their tick
            ax.tick_params(axis="x", labelrotation=25)
            for label in ax.get_xticklabels():
                label.set_horizontalalignment("right")
                label.set_rotation_mode("anchor")
        ax.set_title({"latency": "Latency (sent → result)", "TTFT": "Time to first token"}[metric])
        ax.set_xlabel("workload")
        ax.set_ylabel(f"{metric} (s)")
        ax.margins(y=0.12)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    _save(fig, file)


def plot_over_time(series: list[dict], file: Path, *, ylabel: str = "head lag (versions behind latest)",
                   title: str = "Policy lag of the served drafter heads",
                   events: list[tuple[float, str]] = ()) -> None:
    """Lines or points over time: each series {label, t, y, points: bool, jitter: float (points only: a
    uniform vertical spread, so that integer values shared by many points still show how many)}."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    scale, unit = time_unit(max((t for s in series for t in s["t"]), default=0))
    for s in series:
        ts = [t / scale for t in s["t"]]
        if s.get("points"):
            spread = s.get("jitter", 0.0)
            ys = np.asarray(s["y"], dtype=float) + (rng.uniform(-spread, spread, len(ts)) if spread else 0.0)
            ax.scatter(ts, ys, s=8, alpha=0.5, label=s["label"])
        else:
            ax.step(ts, s["y"], where="post", lw=1.5, label=s["label"], marker="o" if len(ts) < 30 else None, ms=3)
    _mark_events(ax, events, scale)
    ax.set_title(title)
    ax.set_xlabel(f"time since replay start ({unit})")
    ax.set_ylabel(ylabel)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=min(0, min((y for s in series for y in s["y"]), default=0)) - 0.3)
    ax.grid(alpha=0.3)
    _legend(ax)
    _save(fig, file)


# ---------------------------------------------------------------- drift studies (dvi drift)

ARM_STYLES = {"frozen_untrained": ("0.45", "--"), "frozen_offline": ("tab:orange", "-."),
              "online_kl": ("tab:blue", "-"), "online_kl_rl": ("tab:green", "-"),
              "online_kl_rl_memory": ("tab:purple", "-")}


def _arm_style(arm: str, i: int) -> tuple[str, str]:
    return ARM_STYLES.get(arm, (f"C{(i + 4) % 10}", "-"))


def plot_drift_mal(curves: dict[str, tuple[list, list]], phases: list[tuple[float, str]], end: float, file: Path, *,
                   rolling: int, recoveries: dict[str, list[tuple[float, float]]] | None = None) -> None:
    """Live MAL over the trace's requests, one line per arm: curves[arm] = (x, rolling MAL), x the request
    index; phases = (start x, workload) with boundaries drawn as vertical lines, names on top; recoveries
    (x, y) marked per arm."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.4))
    starts = [x for x, _ in phases] + [end]
    for i, (x, name) in enumerate(phases):
        if i:
            ax.axvline(x + 0.5, color="0.3", lw=1, ls=":")
        if i % 2:
            ax.axvspan(x + 0.5, starts[i + 1] + 0.5, color="0.93", lw=0, zorder=0)
        ax.text((x + starts[i + 1]) / 2 + 0.5, 1.01, name, transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=9, clip_on=False)
    for i, (arm, (xs, ys)) in enumerate(curves.items()):
        color, ls = _arm_style(arm, i)
        # one segment per phase: the rolling mean restarts at each boundary
        segments, current = [], ([], [])
        for x, y in zip(xs, ys):
            if current[0] and any(current[0][-1] <= s < x for s in starts[1:-1]):
                segments.append(current)
                current = ([], [])
            current[0].append(x)
            current[1].append(y)
        segments.append(current)
        for j, (sx, sy) in enumerate(segments):
            ax.plot(sx, sy, color=color, ls=ls, lw=1.6, label=arm if j == 0 else None,
                    marker="o" if len(xs) <= 80 else None, ms=2.5)
        points = (recoveries or {}).get(arm) or []
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=70, facecolors="none", edgecolors=color,
                       linewidths=1.6, zorder=5)
    if any((recoveries or {}).values()):
        ax.scatter([], [], s=70, facecolors="none", edgecolors="0.2", label="recovered")
    ax.set_xlim(0.5, end + 0.5)
    ax.set_title(f"Live MAL across workload shifts (rolling mean of {rolling} requests within each phase)",
                 pad=18)
    ax.set_xlabel("request (position in the trace)")
    ax.set_ylabel("mean accepted length\n(tokens/round)")
    ax.grid(alpha=0.3)
    _legend(ax)
    _save(fig, file)


def plot_drift_phases(phases: list[str], panels: list[tuple], file: Path) -> None:
    """Grouped bars per phase, one bar per arm; one panel per (title, y label, {arm: value per phase}[,
    bar label format such as "{:.2f}"])."""
    import numpy as np

    plt = _pyplot()
    arms = list(dict.fromkeys(a for panel in panels for a in panel[2]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7, 0.55 * len(phases) * max(1, len(arms)) + 3),
                                                      3.4 * len(panels)), squeeze=False)
    x, width = np.arange(len(phases)), 0.8 / max(1, len(arms))
    for row, (ax, (title, ylabel, values, *fmt)) in enumerate(zip(axes[:, 0], panels)):
        fmt = fmt[0] if fmt else "{:.3g}"
        for i, arm in enumerate(arms):
            ys = (values.get(arm) or [None] * len(phases))[:len(phases)]
            color, _ = _arm_style(arm, i)
            bars = ax.bar(x + (i - (len(arms) - 1) / 2) * width, [np.nan if y is None else y for y in ys], width,
                          label=arm, color=color)
            ax.bar_label(bars, labels=["" if y is None else fmt.format(y) for y in ys], fontsize=7, padding=1)
        ax.set_xticks(x, phases)
        ax.set_title(title)
        ax.set_xlabel("phase (workload, in trace order)")
        ax.set_ylabel(ylabel)
        ax.margins(y=0.15)
        ax.grid(alpha=0.3, axis="y")
        if row == 0:  # the same arms and colours in every panel
            _legend(ax)
    _save(fig, file)
