"""The report of a run directory (dvi/report/run.py, `dvi report`): built from a synthetic run directory
in the contract's format, from a partial one, and refused for a directory that is not a run."""
from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest

from dvi import cli
from dvi.report.run import PLOT_FILES, write_run_report
from run_fixtures import assert_png

ERROR = "ActorDiedError: actor 1 died (OOM) | while decoding"


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def make_run_dir(out: Path, n_requests: int = 8, workloads=("chat", "code"), steps: int = 6,
                 duration_s: float = 20.0, seed: int = 0) -> dict:
    """A run directory as `dvi run` writes it; MAL and head versions rise over the run. The third request
    fails. Returns its summary."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text("run_id: synthetic\nactors: 2\n")
    _jsonl(out / "trace.jsonl", [{"request_id": f"r{i}", "workload": workloads[i % len(workloads)]}
                                 for i in range(n_requests)])
    n_versions, snapshots = max(2, steps // 3), max(3, int(duration_s / 5))
    requests = []
    for i in range(n_requests):
        workload, arrival = workloads[i % len(workloads)], duration_s * i / n_requests
        latency = 0.4 + rng.lognormvariate(0, 0.5) * (1.5 if workload == "code" else 1.0)
        done, progress = arrival + latency, i / max(n_requests - 1, 1)
        snapshot = min(int(done / duration_s * snapshots), snapshots)  # the latest version as metrics.jsonl saw it
        version = max(int(snapshot / snapshots * (n_versions - 1)) - rng.choice((0, 0, 0, 1, 1, 2)), 0)
        record = {"request_id": f"r{i}", "workload": workload, "arrival_s": arrival, "sent_s": arrival,
                  "done_s": done, "actor": i % 2, "ok": True, "error": None, "latency_s": latency,
                  "ttft_s": latency * 0.2, "tokens": 64, "tokens_per_s": 64 / (latency * 0.8),
                  "mean_accepted_length": 1.2 + 1.3 * progress + (0.3 if workload == "code" else 0.0)
                  + rng.gauss(0, 0.15),
                  "extra": {"head_version": version, "drafted": 200, "accepted": 120, "rounds": 40,
                            "prompt_tokens": 30, "stop_reason": "length", "actor_id": i % 2, "pid": 100 + i % 2}}
        if i == 2:
            record.update(ok=False, error=ERROR, latency_s=None, ttft_s=None, tokens=None, tokens_per_s=None,
                          mean_accepted_length=None, extra={})
        requests.append(record)
    _jsonl(out / "requests.jsonl", requests)

    metrics = []
    for s in range(snapshots + 1):
        t = duration_s * s / snapshots
        latest, lag = int(s / snapshots * (n_versions - 1)), rng.choice((0, 0, 0, 1, 1, 2))
        metrics.append({"t": t, "event": "versions", "latest": latest})
        metrics.append({"t": t, "event": "actors", "step": s, "requests_done": int(n_requests * s / snapshots),
                        "requests_failed": int(s > 0), "charts/served_tokens_per_s": 90 + 40 * s / snapshots
                        + rng.gauss(0, 5), "charts/mean_accepted_length": 1.3 + 1.3 * s / snapshots,
                        "charts/head_version": max(latest - lag, 0) if s else None,
                        "charts/head_lag": lag if s else None, "charts/queue_depth": s % 3,
                        "charts/batch_size": 1 + s % 4 if s else None, "actors": []})
    metrics.append({"t": duration_s * 0.4, "event": "actor_restart", "detail": "actor 1 died; restarted"})
    metrics.sort(key=lambda m: m["t"])
    _jsonl(out / "metrics.jsonl", metrics)

    learner, warmup = [], max(1, steps // 4)
    for step in range(1, steps + 1):
        f = min(max((step - warmup) / max(steps // 2, 1), 0.0), 1.0)
        learner.append({"step": step, "version": step // 3, "losses/kl": 2.0 * math.exp(-step / (steps / 3)),
                        "losses/ce": 3.0 - 1.5 * step / steps, "losses/pg": -0.1 * f + rng.gauss(0, 0.02),
                        "losses/total": 0.0, "charts/kl_weight": 1 - 0.7 * f, "charts/ce_weight": 0.5 * f,
                        "charts/pg_weight": f, "charts/transition_lag_mean": 0.5})
        learner[-1]["losses/total"] = (learner[-1]["losses/kl"] * learner[-1]["charts/kl_weight"]
                                       + learner[-1]["losses/ce"] * learner[-1]["charts/ce_weight"])
        if step % 3 == 0:
            learner.append({"step": step, "version": step // 3, "charts/publish_latency_ms": 12.0})
    learner.insert(len(learner) // 2, {"step": steps // 2, "version": 1, "event": "resume", "checkpoint": "s"})
    _jsonl(out / "learner" / "metrics.jsonl", learner)
    versions = [{"version": v, "step": 3 * v, "bytes": 1_000_000, "latency_ms": 10.0,
                 "published_at": 1.7e9 + v,
                 "heldout_mal": 1.0 + 1.4 * (1 - math.exp(-3 * v / n_versions)) + rng.gauss(0, 0.03) * (v > 0)} for v in range(n_versions)]
    _jsonl(out / "learner" / "versions.jsonl", versions)

    summary = {"run_id": "synthetic", "requests_total": n_requests, "requests_completed": n_requests - 1,
               "requests_failed": 1, "transitions_written": 12345, "transitions_trained": 12000,
               "transitions_dropped": 7, "dropped_detail": {"dropped_oldest": 0, "stale": 5, "duplicates": 2},
               "transitions_buffered": 338, "deadletter": 0, "counts_balance": True,
               "versions_published": n_versions, "mal_first_window": versions[0]["heldout_mal"],
               "mal_last_window": versions[-1]["heldout_mal"],
               "heldout_mal_by_version": {str(v["version"]): v["heldout_mal"] for v in versions},
               "live_mal_first_window": 1.347, "live_mal_last_window": 2.618,
               "tokens_per_s_first_window": 91.25, "tokens_per_s_last_window": 131.5,
               "latency_s": {"p50": 1.2, "p90": 2.5, "p99": 3.9}, "wall_s": duration_s + 3, "actors": 2,
               "started_at": 1.75e9, "events": {"versions": snapshots + 1, "actor_restart": 1},
               "machine": "test-box", "workloads": {}}
    (out / "summary.json").write_text(json.dumps(summary))
    return summary


def test_a_full_run_directory_renders_every_plot_and_table(tmp_path):
    make_run_dir(tmp_path)
    report = write_run_report(tmp_path)
    assert report == tmp_path / "report.md"
    text = report.read_text()
    for number in ("12,345", "12,000", "338", "1.347", "2.618", "91.2", "131.5", "23.0 s", "v0 1.000",
                   "stale 5", "p99 3.900", "2025-06-15"):
        assert number in text, number
    assert "test-box" in text and "# Run report: synthetic" in text
    assert ERROR.replace("|", "\\|") in text  # the failed request's error, escaped for the table
    assert "r2" in text and "[config.yaml](config.yaml)" in text and "[trace.jsonl](trace.jsonl)" in text
    for name in PLOT_FILES.values():
        assert f"](plots/{name})" in text, name
        assert_png(tmp_path / "plots" / name)
    assert "Not plotted" not in text and "missing" not in text
    assert re.search(r"\| chat \| 4 \| 3 \| 1 \|", text) and re.search(r"\| code \| 4 \| 4 \| 0 \|", text)
    assert "Restarts: actor restart × 1" in text


def test_a_run_with_only_requests_still_renders_and_names_what_is_missing(tmp_path):
    make_run_dir(tmp_path)
    for name in ("summary.json", "metrics.jsonl", "config.yaml", "trace.jsonl"):
        (tmp_path / name).unlink()
    for name in ("metrics.jsonl", "versions.jsonl"):
        (tmp_path / "learner" / name).unlink()
    with (tmp_path / "requests.jsonl").open("a") as f:
        f.write('{"request_id": "r9", "workl')  # cut short by a crash
    text = write_run_report(tmp_path).read_text()
    for name in ("summary.json", "metrics.jsonl", "learner/metrics.jsonl", "learner/versions.jsonl", "config.yaml",
                 "trace.jsonl"):
        assert f"`{name}`" in text, name
    assert "1 unreadable line skipped" in text and ERROR.replace("|", "\\|") in text
    assert "_Not plotted: learner/versions.jsonl has no held-out MAL" in text and "_Not plotted: no learner/metrics.jsonl" in text
    for key in ("live", "latency", "head_lag"):  # from requests.jsonl alone
        assert f"](plots/{PLOT_FILES[key]})" in text, key
        assert_png(tmp_path / "plots" / PLOT_FILES[key])
    assert not (tmp_path / "plots" / PLOT_FILES["learner"]).exists()


def test_dvi_report_prints_the_report_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"report": "dvi.cli.report"})  # only the command under test
    make_run_dir(tmp_path, n_requests=4, steps=3)
    assert cli.main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.md")


@pytest.mark.parametrize("exists", [True, False])
def test_dvi_report_refuses_a_directory_that_is_not_a_run(tmp_path, capsys, monkeypatch, exists):
    monkeypatch.setattr(cli, "COMMANDS", {"report": "dvi.cli.report"})
    run_dir = tmp_path / "empty"
    if exists:
        run_dir.mkdir()
    assert cli.main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dvi report: error: ") and str(run_dir) in err
    assert ("not a run directory" if exists else "no such run directory") in err
