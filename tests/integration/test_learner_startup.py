"""The learner never delays serving: its draft vocabulary comes from the stream the actors write (read,
not consumed), its held-out paths from a background thread, and `dvi run` replays the trace while it
prepares, saying on the console what it does."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file

from buffer.keys import RunKeys
from learner.served_vocab import served_token_counts
from learner.status import LearnerStatus, read_status
from learner_data import K, greedy_paths, rounds, verifier, write
from run_fixtures import DVI, dvi_env, read_jsonl, request, write_run
from selfspec.drafter import DrafterHead
from selfspec.split import SplitModel



@pytest.fixture(scope="module")
def transitions():
    model = verifier()
    head = DrafterHead(SplitModel(model, K), _head_config())
    return [t for p in greedy_paths(model, 6) for t in rounds(p, head)]


def _head_config():
    from selfspec.drafter import HeadConfig

    return HeadConfig(adapter_hidden=32, lora_rank=4)


def test_served_counts_read_the_first_positions_and_consume_nothing(redis_client, transitions):
    write(redis_client, "learn", transitions, frame_size=4)
    want = sum(t.n for t in transitions[:10])
    counts = served_token_counts(redis_client, "learn", 256, want, stop=lambda: False,
                                 status=LearnerStatus(redis_client, "learn"))
    # whole frames are read: at least `want` positions, at most one frame (4 transitions) more
    seen = int(counts.sum())
    expected = np.zeros(256, np.int64)
    taken = 0
    for t in transitions:
        if taken >= want:
            break
        np.add.at(expected, t.target_tokens, 1)
        taken += t.n
    assert want <= seen <= want + sum(t.n for t in transitions[10:14])
    assert (counts >= expected).all() and counts.sum() - expected.sum() == seen - taken
    assert read_status(redis_client, "learn")["vocab"] == f"served tokens for the draft vocabulary {want}/{want} (done)"
    # nothing was consumed: every entry is still there, none delivered to the learners' group
    key = RunKeys("learn").transitions
    assert redis_client.xlen(key) == -(-len(transitions) // 4)
    group = redis_client.xinfo_groups(key)[0]
    assert group["pending"] == 0 and group["last-delivered-id"] in ("0-0", b"0-0")


def test_served_counts_stop_with_what_was_served(redis_client, transitions):
    write(redis_client, "learn", transitions[:3], frame_size=4)
    stops = iter([False, False, True])
    counts = served_token_counts(redis_client, "learn", 256, 10**6, stop=lambda: next(stops),
                                 status=LearnerStatus(None, "learn"))
    assert counts.sum() == sum(t.n for t in transitions[:3])


def test_dvi_run_serves_while_the_learner_prepares(tmp_path):
    """The learner waits for more served tokens than the run will ever serve and generates held-out paths:
    every request is still answered, version 0 comes after the first answer (when the run asks the learner
    to stop), the console shows the learner's progress, and every transition is accounted for."""
    rows = [request(i, ("chat", "code")[i % 2], max_new_tokens=12) for i in range(10)]
    config = write_run(tmp_path, rows, **{"head.draft_vocab": 64, "learner.draft_vocab_from": "served",
                                          "learner.vocab_tokens": 10**6,
                                          "learner.heldout": {"workload": "builtin", "prompts": 2,
                                                              "max_new_tokens": 6, "collect_batch": 1},
                                          "trace.arrival": {"kind": "closed_loop", "users": 2},
                                          "drain_timeout_s": 2})  # nothing is consumed before the stop
    env = {**dvi_env(), "DVI_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([DVI, "run", "--config", str(config), "--no-progress"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["requests_completed"] == len(rows) and summary["requests_failed"] == 0
    assert summary["first_request_s"] is not None and summary["actors_ready_s"] > 0
    versions = read_jsonl(run_dir / "learner" / "versions.jsonl")
    first_answer = summary["started_at"] + summary["actors_ready_s"] + summary["first_request_s"]
    assert versions[0]["version"] == 0 and versions[0]["published_at"] > first_answer
    assert all(v["heldout_mal"] is not None for v in versions), "every version scored once the paths existed"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[learner] ")]
    assert any("served tokens for the draft vocabulary" in line for line in lines), proc.stdout[-2000:]
    assert any("held-out greedy paths 2/2 (done)" in line for line in lines), proc.stdout[-2000:]
    events = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "learner_status"]
    assert {e["activity"] for e in events} >= {"setup", "vocab", "heldout"}
    # the vocabulary came from what was served: the tokens of the served transitions are in it
    vocab = load_file(str(run_dir / "learner" / "heads" / "v0000" / "head.safetensors"))["vocab_ids"]
    assert len(vocab) == 64 and not np.array_equal(np.sort(vocab), np.arange(64)), "not the lowest ids"
    assert summary["counts_balance"] is True and summary["transitions_written"] > 0
