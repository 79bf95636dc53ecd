"""`dvi run` (the real CLI, a subprocess) survives what kills parts of a distributed run: a generation
actor SIGKILLed mid-run comes back and its requests complete or are reported failed, the learner rank
SIGKILLed resumes from its checkpoint, and redis-server SIGKILLed is restarted from its AOF. Also: a
Redis that is not there at the start is one clear line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from run_fixtures import DVI, dvi_env, read_jsonl, request, write_run

from dvi import cli


def wait_for(what: str, check, proc, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"dvi run exited ({proc.returncode}) while waiting for {what}:\n{proc.stderr.read()}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def last_snapshot(run_dir, predicate=lambda s: True):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    for line in reversed(lines[:-1] if lines and not lines[-1].endswith("}") else lines):
        record = json.loads(line)
        if record.get("event") == "actors" and predicate(record):
            return record
    return None


def has_event(run_dir, name):
    path = run_dir / "metrics.jsonl"
    return path.exists() and f'"event": "{name}"' in path.read_text()


def test_actor_learner_and_redis_killed_mid_run(tmp_path):
    # 150 requests arriving over ~30 s: long enough for the three faults (about 20 s on a 2-core CPU)
    rows = [request(i, ("chat", "code")[i % 2], arrival_s=i * 0.2) for i in range(150)]
    config = write_run(tmp_path, rows)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([DVI, "run", "--config", str(config), "--no-progress"], env=dvi_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("a learner checkpoint", lambda: (run_dir / "learner/checkpoints/latest").exists(), proc)
        busy = wait_for("served requests", lambda: last_snapshot(
            run_dir, lambda s: all(a and a["requests_done"] >= 2 for a in s["actors"])), proc)
        learner_pid = busy["learner_pids"][0]
        os.kill(busy["actors"][0]["pid"], signal.SIGKILL)  # both at once: the run restarts each on its own
        os.kill(learner_pid, signal.SIGKILL)
        wait_for("the actor's restart", lambda: has_event(run_dir, "actor_restart"), proc)
        wait_for("the learner's restart", lambda: last_snapshot(
            run_dir, lambda s: s["learner_pids"] and learner_pid not in s["learner_pids"]), proc)

        os.kill(last_snapshot(run_dir)["redis_pid"], signal.SIGKILL)
        wait_for("redis' restart", lambda: has_event(run_dir, "redis_restart"), proc)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    (tmp_path / "stderr.txt").write_text(err)
    assert proc.returncode == 0, err[-3000:]
    records = read_jsonl(run_dir / "requests.jsonl")
    assert sorted(r["request_id"] for r in records) == sorted(r["request_id"] for r in rows)  # none lost
    assert all(r["ok"] or r["error"] for r in records)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["requests_completed"] + summary["requests_failed"] == len(rows)
    assert summary["requests_completed"] >= len(rows) - 4  # only requests in flight at a kill may fail
    assert summary["events"]["actor_restart"] >= 1
    assert summary["events"]["learner_restart"] >= 1
    assert summary["events"]["redis_restart"] >= 1
    assert summary["learner_error"] is None
    learner_log = read_jsonl(run_dir / "learner/metrics.jsonl")
    assert any(r.get("event") == "resume" for r in learner_log)  # it resumed from a checkpoint
    assert summary["transitions_trained"] > 0 and summary["versions_published"] >= 2


def test_unreachable_redis_is_one_line(tmp_path, capsys):
    config = write_run(tmp_path, [request(0, "chat")])
    capsys.readouterr()
    code = cli.main(["run", "--config", str(config), "--redis-url", "redis://127.0.0.1:1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "no redis server at redis://127.0.0.1:1" in err[0], err
