"""A `dvi run` directory read leniently, and the numbers its report draws from.

Files read (any may be missing or cut short by a crash; what exists is returned, what is missing is
named): summary.json, requests.jsonl, metrics.jsonl, learner/metrics.jsonl, learner/versions.jsonl;
config.yaml and trace.jsonl are only checked for. A directory with neither summary.json nor
requests.jsonl is not a run directory.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from dvi.report.format import jsonl_records, number

RESTARTS = ("actor_restart", "learner_restart", "redis_restart", "learner_failed")


def learner_dir(run_dir: str | Path) -> Path:
    """The learner's out_dir in a run directory: its metrics.jsonl, versions.jsonl, checkpoints/ and
    published heads (learner.publish.published_heads)."""
    return Path(run_dir) / "learner"


@dataclass
class RunFiles:
    """What a run directory holds, read leniently: absent files are None/[], unreadable lines counted."""
    dir: Path
    summary: dict | None = None
    requests: list[dict] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    learner: list[dict] = field(default_factory=list)
    versions: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # relative paths not there
    problems: list[str] = field(default_factory=list)  # one line per file read only in part


def _read_jsonl(path: Path, files: RunFiles) -> list[dict]:
    rel = path.relative_to(files.dir).as_posix()
    if not path.is_file():
        files.missing.append(rel)
        return []
    records, bad = jsonl_records(path)
    if bad:
        files.problems.append(f"`{rel}`: {bad} unreadable line{'s' * (bad != 1)} skipped (a run cut short?)")
    return records


def load_run(run_dir: str | Path) -> RunFiles:
    """Read a run directory. Raises FileNotFoundError if it is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no such run directory: {run_dir}")
    if not (run_dir / "summary.json").is_file() and not (run_dir / "requests.jsonl").is_file():
        raise FileNotFoundError(f"not a run directory: {run_dir} has neither summary.json nor requests.jsonl")
    files = RunFiles(run_dir)
    if (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text(errors="replace"))
            files.summary = summary if isinstance(summary, dict) else None
        except json.JSONDecodeError as err:
            files.problems.append(f"`summary.json`: unreadable ({err})")
        if files.summary is None and not files.problems:
            files.problems.append("`summary.json`: not a JSON object")
    else:
        files.missing.append("summary.json")
    files.requests = _read_jsonl(run_dir / "requests.jsonl", files)
    files.metrics = _read_jsonl(run_dir / "metrics.jsonl", files)
    files.learner = _read_jsonl(learner_dir(run_dir) / "metrics.jsonl", files)
    files.versions = _read_jsonl(learner_dir(run_dir) / "versions.jsonl", files)
    for name in ("config.yaml", "trace.jsonl"):
        if not (run_dir / name).is_file():
            files.missing.append(name)
    return files


# ---------------------------------------------------------------- numbers (the shared ones: dvi/report/format.py)


def values(requests: list[dict], key: str) -> list[float]:
    return [v for v in (number(r.get(key)) for r in requests) if v is not None]


def extra(request: dict) -> dict:
    extra = request.get("extra")
    return extra if isinstance(extra, dict) else {}


def workload(request: dict) -> str:
    return str(request.get("workload") or "(none)")


def by_workload(requests: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in requests:
        groups.setdefault(workload(r), []).append(r)
    return dict(sorted(groups.items()))


def rolling_window(n: int) -> int:
    """About a tenth of a workload's requests, between 1 and 50."""
    return max(1, min(50, round(n / 10)))


def actors_events(metrics: list[dict]) -> list[dict]:
    return sorted((m for m in metrics if m.get("event") == "actors" and number(m.get("t")) is not None),
                  key=lambda m: m["t"])


def restarts(metrics: list[dict]) -> list[dict]:
    return [m for m in metrics if m.get("event") in RESTARTS]


def series(records: list[dict], x: str, y: str) -> tuple[list, list]:
    pairs = [(number(r.get(x)), number(r.get(y))) for r in records]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    return [a for a, _ in pairs], [b for _, b in pairs]


def version_timeline(files: RunFiles) -> tuple[tuple[list, list], str] | None:
    """(times since replay start, latest version at each), sorted; from metrics.jsonl `versions` events,
    else from versions.jsonl published_at if summary.json gives the replay start as unix time."""
    pairs = [(number(m.get("t")), number(m.get("latest"))) for m in files.metrics if m.get("event") == "versions"]
    pairs = [(t, v) for t, v in pairs if t is not None and v is not None]
    source = "metrics.jsonl versions events"
    start = number((files.summary or {}).get("started_at"))
    if not pairs and start is not None:
        pairs = [(number(v.get("published_at")), number(v.get("version"))) for v in files.versions]
        pairs = [(t - start, v) for t, v in pairs if t is not None and v is not None]
        source = "versions.jsonl published_at against summary.json started_at"
    if not pairs:
        return None
    pairs.sort()
    latest, running = [], -math.inf
    for _, v in pairs:
        running = max(running, v)
        latest.append(running)
    return ([t for t, _ in pairs], latest), source
