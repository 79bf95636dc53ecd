"""`dvi run` as a user launches it on a cluster: `ray start --head` on this machine, `ray job submit` of
a short run from the repository, the job SUCCEEDED, and its run directory balances its counts and
reports each bad request (a malformed trace line, an unknown workload, a prompt longer than the
model's context) while serving the rest."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from run_fixtures import REPO, dvi_env, free_port, read_jsonl, request, write_run

from dvi.config import load_config
from dvi.run.config import RunConfig

RAY = str(Path(sys.executable).parent / "ray")



def test_ray_job_submit_of_dvi_run(tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    good = [request(i, ("chat", "code")[i % 2]) for i in range(12)]
    bad = ['{"request_id": "r9000", "arrival_s": 0, "workload": "chat", "prompt": ',  # cut off: not JSON
           request(9001, "poetry"),  # no such workload in this run
           {**request(9002, "chat"), "prompt": "a very long prompt " * 10}]  # 190 tokens > 96 positions
    config = write_run(tmp_path, good + bad, **{"trace.arrival": {"kind": "closed_loop", "users": 2}})
    env = {**dvi_env(), "RAY_AUTH_MODE": "disabled"}
    dashboard = free_port()
    start = [RAY, "start", "--head", f"--port={free_port()}", "--num-cpus=4", "--include-dashboard=true",
             f"--dashboard-port={dashboard}", "--disable-usage-stats"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        excludes = json.dumps({"excludes": [".venv", "runs", ".git"]})
        deadline = time.monotonic() + 120
        while True:  # `ray start` returns before the dashboard's job agent is up: it says so, and we wait
            submit = subprocess.run(
                [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--runtime-env-json",
                 excludes, "--no-wait", "--submission-id", "dvi-run-test", "--", "dvi", "run", "--config",
                 str(config), "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
            if "No available agent" not in submit.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stderr[-2000:]
        client = JobSubmissionClient(address)
        deadline = time.monotonic() + 300
        while (status := client.get_job_status("dvi-run-test")) not in JobStatus.__members__.values() or \
                not status.is_terminal():
            assert time.monotonic() < deadline, "the job did not finish within 300 s"
            time.sleep(1)
        logs = client.get_job_logs("dvi-run-test")
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)

    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["requests_completed"] == len(good)
    assert summary["requests_failed"] == len(bad)
    assert summary["versions"]["ray"]  # the package versions (selfspec.versions)
    errors = {r["request_id"]: r["error"] for r in read_jsonl(run_dir / "requests.jsonl") if not r["ok"]}
    assert "not JSON" in next(e for k, e in errors.items() if "trace.jsonl:13" in k)
    assert "unknown workload 'poetry'" in errors["r9001"]
    assert "context" in errors["r9002"] or "positions" in errors["r9002"], errors["r9002"]
    # every transition written was trained, dropped, dead-lettered or is still in the stream
    assert summary["transitions_written"] > 0 and summary["transitions_trained"] > 0
    assert summary["counts_balance"] is True
    assert summary["transitions_written"] == (summary["transitions_trained"] + summary["transitions_dropped"]
                                              + summary["deadletter"] + summary["transitions_buffered"])
    assert summary["versions_published"] >= 1
    assert (run_dir / "report.md").exists()
    rerun = load_config(RunConfig, run_dir / "config.yaml")  # the run directory reruns as it is
    assert rerun.trace.path == str(tmp_path / "trace.jsonl") and rerun.actors.count == 2
    assert len(read_jsonl(run_dir / "trace.jsonl")) == len(good) + len(bad) - 1  # the bad line is not a request
