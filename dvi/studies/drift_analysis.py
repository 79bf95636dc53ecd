"""The numbers of a drift study, from its files alone (pure functions: no Ray, Redis or model).

- **Phases** are the trace's consecutive runs of one workload, in request order (trace.jsonl line order):
  `chat×16, code×16, ...`. A request record belongs to the phase of its request_id in the trace.
- **Series**: a phase's completed requests (ok, with a MAL) in completion order (done_s); their live MAL
  (`mean_accepted_length`, accepted drafts + 1 per round) is the phase's series.
- **phase_mal**: the mean of the series; **phase_tokens_per_s**: the phase's tokens over the seconds actors
  spent decoding them (`dvi.report.format.decode_tokens_per_s`).
- **Plateau** of a phase: the mean of the last `plateau_fraction` of its series (at least one request).
- **Recovery** after the shift into phase p (p >= 1): `recovery(series_p, plateau_{p-1}, recovery_fraction,
  rolling)` requests, and `recovery_seconds`: from the shift (the earliest `sent_s` of phase p's requests)
  to the `done_s` of that request. None: never within the phase (or nothing to compare).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dvi.report.format import decode_tokens_per_s, mean, number, read_json, read_jsonl, read_yaml, rolling_mean

DEFAULTS = {"recovery_fraction": 0.9, "plateau_fraction": 0.5, "rolling": 4,
            "arms": ["frozen_untrained", "frozen_offline", "online_kl", "online_kl_rl", "online_kl_rl_memory"]}  # a study without config.yaml


@dataclass
class Phase:
    workload: str
    request_ids: list[str]
    start: int  # index of its first request in the trace


def trace_phases(trace: list[dict]) -> list[Phase]:
    """Consecutive runs of one workload in request order; a workload that comes back is a new phase."""
    phases: list[Phase] = []
    for i, row in enumerate(r for r in trace if r.get("request_id") is not None):
        workload = str(row.get("workload") or "(none)")
        if not phases or phases[-1].workload != workload:
            phases.append(Phase(workload, [], i))
        phases[-1].request_ids.append(str(row["request_id"]))
    return phases


def plateau(series: list[float], fraction: float) -> float | None:
    """The mean of the last `fraction` of the series (at least one value); None for an empty series."""
    if not series:
        return None
    k = max(1, round(fraction * len(series)))
    return sum(series[-k:]) / k


def recovery(series: list[float], plateau: float | None, fraction: float, rolling: int) -> int | None:
    """How many requests of a new phase it takes for the live MAL to recover after a shift.

    `series`: the new phase's per-request MAL in completion order. The rolling MAL after the n-th request
    (n = 1, 2, ...) is the mean of the last `rolling` values up to it, counted within the new phase only
    (the previous phase's requests never pad it; fewer values while n < rolling). Returns the smallest n
    whose rolling MAL is >= `fraction * plateau`: 1 means at once (the first request already reaches it),
    None means never within the series (also for an empty series or no plateau)."""
    if plateau is None or not series:
        return None
    target = fraction * plateau
    for n, value in enumerate(rolling_mean(series, rolling), 1):
        if value >= target - 1e-12:
            return n
    return None


@dataclass
class PhaseData:
    """One phase of one arm: its completed requests in completion order."""
    workload: str
    start: int
    requests: int  # in the trace
    done: list[dict] = field(default_factory=list)  # ok with a MAL and done_s, by done_s
    shift_s: float | None = None  # the earliest sent_s of its requests

    @property
    def series(self) -> list[float]:
        return [float(r["mean_accepted_length"]) for r in self.done]


def split_by_phase(records: list[dict], phases: list[Phase]) -> list[PhaseData]:
    """Each phase's completed requests (ok, with a finite MAL and done_s) in completion order; records whose
    request_id is not in the trace are left out."""
    where = {rid: i for i, p in enumerate(phases) for rid in p.request_ids}
    out = [PhaseData(p.workload, p.start, len(p.request_ids)) for p in phases]
    for r in records:
        i = where.get(str(r.get("request_id")))
        if i is None:
            continue
        sent = number(r.get("sent_s"))
        if sent is not None and (out[i].shift_s is None or sent < out[i].shift_s):
            out[i].shift_s = sent
        if r.get("ok") and number(r.get("mean_accepted_length")) is not None and number(r.get("done_s")) is not None:
            out[i].done.append(r)
    for p in out:
        p.done.sort(key=lambda r: r["done_s"])
    return out


@dataclass
class ArmAnalysis:
    phases: list[PhaseData]
    plateaus: list[float | None]
    recovery_requests: list[int | None]  # one per shift: phases[1:]
    recovery_seconds: list[float | None]
    rolling: int

    def summary(self) -> dict:
        return {"phase_mal": [mean(p.series) for p in self.phases],
                "phase_tokens_per_s": [decode_tokens_per_s(p.done) for p in self.phases],
                "phase_completed": [len(p.done) for p in self.phases],
                "phase_plateau": self.plateaus,
                "recovery_requests": self.recovery_requests, "recovery_seconds": self.recovery_seconds}

    def curve(self) -> tuple[list[float], list[float]]:
        """The rolling MAL (within each phase) at x = the phase's first trace index + n, n = 1, 2, ..."""
        xs, ys = [], []
        for p in self.phases:
            ys += rolling_mean(p.series, self.rolling)
            xs += [p.start + n for n in range(1, len(p.done) + 1)]
        return xs, ys

    def recovery_points(self) -> list[tuple[float, float]]:
        """(x, rolling MAL) where each shift's recovery was reached, for the plot."""
        points = []
        for p, n in zip(self.phases[1:], self.recovery_requests):
            if n is not None:
                points.append((p.start + n, rolling_mean(p.series, self.rolling)[n - 1]))
        return points


def analyze_arm(records: list[dict], phases: list[Phase], recovery_fraction: float, plateau_fraction: float,
                rolling: int) -> ArmAnalysis:
    data = split_by_phase(records, phases)
    plateaus = [plateau(p.series, plateau_fraction) for p in data]
    requests, seconds = [], []
    for prev, p in zip(plateaus, data[1:]):
        n = recovery(p.series, prev, recovery_fraction, rolling)
        requests.append(n)
        seconds.append(None if n is None or p.shift_s is None else max(0.0, p.done[n - 1]["done_s"] - p.shift_s))
    return ArmAnalysis(data, plateaus, requests, seconds, rolling)


def analyze(drift_dir: str | Path, arms: list[str], recovery_fraction: float, plateau_fraction: float,
            rolling: int) -> tuple[dict, dict[str, ArmAnalysis]]:
    """summary.json's `phases` and `arms` of a study directory, and each arm's analysis (for the plots).
    Arms are `arms` in order, then any other directory under arms/; an arm without requests.jsonl gets
    {"run_dir", "missing"}. Raises FileNotFoundError without trace.jsonl."""
    drift_dir = Path(drift_dir)
    trace_path = drift_dir / "trace.jsonl"
    if not trace_path.is_file():
        raise FileNotFoundError(f"not a drift study directory: {drift_dir} has no trace.jsonl")
    phases = trace_phases(read_jsonl(trace_path))
    arms_dir = drift_dir / "arms"
    present = sorted(p.name for p in arms_dir.iterdir() if p.is_dir()) if arms_dir.is_dir() else []
    names = list(dict.fromkeys([*arms, *present]))
    out, analyses = {}, {}
    for arm in names:
        run_dir = drift_dir / "arms" / arm
        entry: dict = {"run_dir": str(run_dir)}
        if not (run_dir / "requests.jsonl").is_file():
            out[arm] = {**entry, "missing": "not run" if not run_dir.exists() else "no requests.jsonl"}
            continue
        analysis = analyze_arm(read_jsonl(run_dir / "requests.jsonl"), phases, recovery_fraction,
                               plateau_fraction, rolling)
        analyses[arm] = analysis
        entry.update(analysis.summary())
        summary = read_json(run_dir / "summary.json")
        entry["heldout_mal_last"] = summary.get("mal_last_window")  # present only when the arm learned
        entry["heldout_mal_first"] = summary.get("mal_first_window")
        entry["wall_s"] = summary.get("wall_s")
        if not summary:
            entry["note"] = "no summary.json (the arm did not finish?)"
        out[arm] = entry
    return {"phases": [p.workload for p in phases], "phase_requests": [len(p.request_ids) for p in phases],
            "arms": out}, analyses


def study_settings(drift_dir: str | Path) -> dict:
    """recovery_fraction, plateau_fraction, rolling and arms from the study's config.yaml, else DEFAULTS."""
    data = read_yaml(Path(drift_dir) / "config.yaml")
    return {**DEFAULTS, **{k: data[k] for k in DEFAULTS if data.get(k) is not None}}


def summarize_study(drift_dir: str | Path, settings: dict | None = None):
    """(summary.json's data, per-arm analyses) of a study directory."""
    settings = settings or study_settings(drift_dir)
    summary, analyses = analyze(drift_dir, list(settings["arms"]), settings["recovery_fraction"],
                                settings["plateau_fraction"], settings["rolling"])
    summary["settings"] = {k: settings[k] for k in ("recovery_fraction", "plateau_fraction", "rolling")}
    return summary, analyses
