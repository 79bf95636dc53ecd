"""The learner in one process against a real redis-server and real DeepSpeed on CPU: it learns, it
computes exactly what the in-process loop computes, it drops stale transitions and corrects the rest
with the importance ratio, and what it publishes loads elsewhere."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from learner_data import REPO, K, config, greedy_paths, rounds, verifier, write

from buffer.config import RedisConfig
from buffer.server import RedisServer
from buffer.stream import run_stats
from buffer.weights import WeightStore
from learner.dist import init_distributed
from learner.metrics_log import MetricsLog
from selfspec.drafter import head_from_weights
from learner.heldout import HeldoutPaths
from learner.publish import head_dir
from learner.trainer import Learner, LearnerSetup
from selfspec.drafter import DrafterHead
from selfspec.greedy_paths import mean_accepted_length
from selfspec.head_format import read_head
from selfspec.objectives import TrainState, train_step
from selfspec.online import frequent_ids
from selfspec.split import SplitModel



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: a second thread only contends (20-30x slower when busy).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    init_distributed()  # world size 1 on a free port; DeepSpeed's engines in this module share it
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with RedisServer(RedisConfig(persistence=False), tmp_path_factory.mktemp("redis")) as s:
        yield s


@pytest.fixture(scope="module")
def model():
    return verifier()


@pytest.fixture(scope="module")
def paths(model):
    return greedy_paths(model, 56)


def fresh_head(model, cfg, vocab_ids=None):
    """The head a learner with this config starts from (same seed, same construction)."""
    torch.manual_seed(cfg.seed)
    return DrafterHead(SplitModel(model, K), cfg.head, vocab_ids)


@pytest.fixture(scope="module")
def trained(server, model, paths, tmp_path_factory):
    """Transitions of the untrained head along 48 greedy paths -> the learner, until the stream is drained."""
    tmp = tmp_path_factory.mktemp("learn")
    cfg = config(tmp, server.url, schedule_config={"warmup_steps": 40, "ramp_steps": 40}, **{"head.draft_vocab": 128})
    vocab = frequent_ids(paths[:48], SplitModel(model, K), 128)
    head0 = fresh_head(model, cfg, vocab)
    sent = [t for p in paths[:48] for t in rounds(p, head0)]
    client = server.client()
    write(client, cfg.run_id, sent)
    with MetricsLog(cfg.out_dir) as log:
        learner = Learner(cfg, client, model, LearnerSetup(heldout=HeldoutPaths(paths[48:]), vocab_ids=vocab, log=log))
        learner.run()
    return learner, cfg, client, sent


def test_published_heads_draft_better_and_better(trained, model, paths):
    learner, cfg, client, sent = trained
    versions = [json.loads(line) for line in (Path(cfg.out_dir) / "versions.jsonl").read_text().splitlines()]
    scores = {v["version"]: v["heldout_mal"] for v in versions}
    assert sorted(scores) == list(range(len(scores))) and len(scores) == learner.counters["published"]
    assert scores[0] < 1.2, "the untrained head (version 0) drafts near chance"
    assert learner.step <= 100 and scores[max(scores)] > 3.0, scores
    # the latest version, pulled from Redis into a fresh head, drafts for the same model as scored
    version, arrays, meta = WeightStore(client, cfg.run_id).pull_if_newer(None)
    head = head_from_weights(SplitModel(model, K), arrays, meta)
    assert version == max(scores) and mean_accepted_length(paths[48:], head, cfg.gamma) == scores[version]
    # every transition trained exactly once, and the stream's run-wide accounting agrees
    assert learner.counters["trained_transitions"] == learner.counters["consumed"] == len(sent)
    assert run_stats(client, cfg.run_id) == {"written": len(sent), "consumed": len(sent)}


def test_metrics_are_logged_like_cleanrl(trained):
    _, cfg, _, _ = trained
    records = [json.loads(line) for line in open(f"{cfg.out_dir}/metrics.jsonl")]
    steps = [r for r in records if "losses/total" in r]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    for key in ("losses/kl", "losses/ce", "losses/pg", "charts/kl_weight", "charts/pg_weight", "charts/transition_lag_mean",
                "charts/transitions_per_s", "charts/positions_per_s", "charts/steps_per_s"):
        assert key in steps[-1], key
    keys = {k for r in steps for k in r}
    assert {"charts/workload/chat", "charts/workload/code"} <= keys  # batch composition
    assert "charts/kind/drafted" in keys
    assert steps[-1]["charts/pg_weight"] > 0, "the schedule moved on by learner step"
    published = [r["version"] for r in records if "charts/publish_latency_ms" in r]
    scored = [r["version"] for r in records if "charts/heldout_mal" in r]
    assert published and scored == published, "every published version scored once, in order"
    assert any("charts/checkpoint_s" in r for r in records)
    versions = [json.loads(line)["version"] for line in open(f"{cfg.out_dir}/versions.jsonl")]
    assert versions == sorted(set(versions))
    assert any(p.name.startswith("events.out.tfevents") for p in (cfg.checkpoint_dir.parent / "tb").iterdir())


@pytest.mark.parametrize("gate", [0.02, None])
def test_publish_gate_keeps_a_worse_head_from_the_actors(server, model, paths, tmp_path, gate):
    """A learner learns this model's paths, then trains on another model's, which makes it draft worse here.
    With the gate, no version more than `gate` below the best published one reaches the weight store; without
    it, the worse head is published."""
    run_id = f"gate-{gate}"
    cfg = config(tmp_path, server.url, run_id=run_id, publish_gate=gate,
                 schedule_config={"warmup_steps": 40, "ramp_steps": 40}, **{"head.draft_vocab": 128})
    vocab = frequent_ids(paths[:48], SplitModel(model, K), 128)
    head0 = fresh_head(model, cfg, vocab)
    client, records = server.client(), []
    learner = Learner(cfg, client, model, LearnerSetup(heldout=HeldoutPaths(paths[48:]), vocab_ids=vocab,
                                                       log=records.append))
    write(client, run_id, [t for p in paths[:24] for t in rounds(p, head0, run_id=run_id)])
    learner.run()
    learned = learner.version
    other = greedy_paths(verifier(seed=6), 24, seed=1)  # another model's continuations
    write(client, run_id, [t for p in other for t in rounds(p, head0, run_id=run_id)])
    learner.run()

    scores = [json.loads(line)["heldout_mal"] for line in (Path(cfg.out_dir) / "versions.jsonl").read_text().splitlines()]
    best = max(scores)
    served, _, _ = WeightStore(client, run_id).pull_if_newer(None)
    if gate is None:
        assert best > 3.0 and learner.counters["held_back"] == 0 and scores[served] < best - 0.5
        return
    candidates = [r["charts/candidate_mal"] for r in records if "charts/candidate_mal" in r]
    assert best > 3.0 and min(candidates) < best - 0.5, "the second phase made the head draft worse here"
    assert learner.counters["held_back"] > 0 and learner.version - learned < learner.counters["held_back"]
    assert all(s >= max(scores[:i + 1]) - gate for i, s in enumerate(scores)), "each version near the best before it"
    assert served == learner.version and scores[served] >= best - gate


def test_published_version_loads_in_another_process(trained, server, tmp_path):
    learner, cfg, _, _ = trained
    out = tmp_path / "loaded.npz"
    script = f"""
import sys; sys.path.insert(0, {str(REPO / 'tests')!r})
import numpy as np
from learner_data import K, verifier
from buffer.connection import connect
from buffer.weights import WeightStore
from selfspec.drafter import head_from_weights, head_weights
from selfspec.head_format import HeadSpec
from selfspec.drafter import DrafterHead, HeadConfig
from selfspec.split import SplitModel
split = SplitModel(verifier(), K)
expected = HeadSpec.of(*head_weights(DrafterHead(split, HeadConfig(**{cfg.head.model_dump()!r}))), base_model={learner.publisher.base_model!r})
version, arrays, meta = WeightStore(connect({server.url!r}), {cfg.run_id!r}, expected=expected).pull_if_newer(None)
np.savez({str(out)!r}, version=version, **head_weights(head_from_weights(split, arrays, meta))[0])
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=120)
    # what the learner published last, as it wrote it to disk (its head may have trained on since: the gate)
    saved, _ = read_head(head_dir(cfg.out_dir, learner.version))
    with np.load(out) as got:
        assert int(got["version"]) == learner.version
        np.testing.assert_array_equal(got["vocab_ids"], learner.head.vocab_ids.numpy())
        assert set(got.files) == {"version", *saved} and set(learner.parameters()) < set(saved)
        for name, value in saved.items():
            np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_same_losses_as_the_in_process_loop(server, paths, tmp_path, stage):
    """float32: DeepSpeed on CPU reduces only float32/bf16 gradients, and ZeRO 1/2 keep a float32 master
    copy, so float64 could not be compared exactly; in float32 every stage is bitwise what torch's
    AdamW does in `dvi online`'s loop."""
    model32 = verifier(torch.float32)
    cfg = config(tmp_path, server.url, run_id=f"same{stage}", deepspeed=str(REPO / f"configs/deepspeed/zero{stage}.json"),
                 schedule_config={"warmup_steps": 2, "ramp_steps": 3}, publish_every_steps=100,
                 **{"loss.baseline_init": 0.3})
    drafted = [t for p in paths[:40] for t in rounds(p, fresh_head(model32, cfg))]
    accepted = [t for t in drafted if t.accept_mask.any()]  # rare for an untrained head: keep some for CE and PG
    sent = (accepted[:24] + [t for t in drafted if not t.accept_mask.any()][:72])
    np.random.default_rng(0).shuffle(sent)
    write(server.client(), cfg.run_id, sent)
    records = []
    Learner(cfg, server.client(), model32, LearnerSetup(log=records.append)).run()
    learned = [r for r in records if "losses/total" in r]

    head = fresh_head(model32, cfg)
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    state = TrainState.create(cfg.schedule, cfg.schedule_config, cfg.loss)
    local = [train_step(head, optimizer, sent[i:i + cfg.batch_size], state, cfg.loss)
             for i in range(0, len(sent), cfg.batch_size)]
    assert len(learned) == len(local) == 6
    for mine, theirs in zip(learned, local):
        for key in ("losses/total", "losses/kl", "losses/ce", "losses/pg", "charts/baseline", "charts/pg_weight"):
            assert mine[key] == theirs[key], (key, mine["step"])
    assert any(r["losses/pg"] != 0 and r["charts/ce_weight"] > 0 for r in learned), "every loss term took part"


def test_stale_transitions_are_dropped_and_counted(server, model, paths, tmp_path):
    cfg = config(tmp_path, server.url, run_id="stale", publish_every_steps=1000, **{"stream.max_transition_lag": 1})
    # an earlier learner of this run published up to version 4: this one starts at 5
    WeightStore(server.client(), cfg.run_id).publish(4, {"w": np.zeros(1, np.float32)}, {"base_model": "x"})
    head0 = fresh_head(model, cfg)
    by_version = {v: [t for p in paths[4 * i:4 * i + 4] for t in rounds(p, head0, version=v, run_id=f"v{v}")]
                  for i, v in enumerate((5, 4, 3, 0))}
    write(server.client(), cfg.run_id, [t for ts in by_version.values() for t in ts])
    learner = Learner(cfg, server.client(), model)
    counters = learner.run()
    stale = len(by_version[3]) + len(by_version[0])
    assert learner.version > 5 and counters["stale"] == stale
    assert counters["trained_transitions"] == counters["consumed"] == len(by_version[5]) + len(by_version[4])
    assert run_stats(server.client(), cfg.run_id)["stale"] == stale


def test_importance_ratio_corrects_the_policy_gradient(server, model, paths, tmp_path):
    """Behaviour log-probs stored at half the current head's probability: ratio 2, clipped to 1 + eps
    where the advantage is positive and left whole where it is negative (PPO's min)."""
    cfg = config(tmp_path, server.url, run_id="ratio", schedule="pg_only", batch_size=64, max_steps=1,
                 **{"loss.baseline_init": 0.5, "loss.clip_eps": 0.2})
    drafted = [t for p in paths[:40] for t in rounds(p, fresh_head(model, cfg))]
    sent = [t for t in drafted if t.accept_mask.any()][:16] + [t for t in drafted if not t.accept_mask.any()][:48]
    for t in sent:
        t.draft_logprobs = (t.draft_logprobs - np.float32(math.log(2))).astype(np.float32)
    write(server.client(), cfg.run_id, sent)
    records = []
    Learner(cfg, server.client(), model, LearnerSetup(log=records.append)).run()
    first = next(r for r in records if "losses/pg" in r)
    accepted = sum(int(t.accept_mask.sum()) for t in sent)
    rewarded = sum(int(t.on_path.sum()) for t in sent)
    assert 0 < accepted < rewarded
    # advantage +0.5 (accepted): min(2 * 0.5, 1.2 * 0.5) = 0.6; -0.5 (rejected): min(-1.0, -0.6) = -1.0
    expected = -(0.6 * accepted - 1.0 * (rewarded - accepted)) / rewarded
    assert first["losses/pg"] == pytest.approx(expected, rel=1e-6)
    assert first["charts/importance_ratio_mean"] == pytest.approx(2.0, rel=1e-6)
    assert first["charts/clip_fraction"] == 1.0


def test_resume_after_a_crash_between_checkpoint_and_acknowledgement(server, model, paths, tmp_path):
    """The narrow window of a commit: the checkpoint holds the training, the entries are still pending.
    A resumed learner acknowledges them without training them again, then trains the rest once."""
    cfg = config(tmp_path, server.url, run_id="window", **{"checkpoint.every_steps": 1000})
    sent = [t for p in paths[:8] for t in rounds(p, fresh_head(model, cfg), run_id="window")]
    write(server.client(), cfg.run_id, sent)
    first = Learner(cfg, server.client(), model)
    first.run(steps=4)  # ends with a commit: 4 batches acknowledged
    committed = first.counters["consumed"]
    for _ in range(2):  # two more steps of the loop, then the first half of a commit ...
        while not first._fill():
            pass
        first._train_held()
    first._checkpoint()  # ... and the process dies before acknowledging: nothing more of `first` runs
    uncommitted = first.counters["trained_transitions"] - committed
    assert run_stats(server.client(), cfg.run_id)["consumed"] == committed and uncommitted > 0

    records = []
    second = Learner(cfg, server.client(), model, LearnerSetup(resume=True, log=records.append))
    assert records[0]["event"] == "resume" and records[0]["recovered_acks"] == uncommitted
    assert run_stats(server.client(), cfg.run_id)["consumed"] == committed + uncommitted
    assert second.step == 6 and second.version == first.version
    counters = second.run()
    assert counters["trained_transitions"] == counters["consumed"] == len(sent)
    assert run_stats(server.client(), cfg.run_id) == {"written": len(sent), "consumed": len(sent)}


def test_bench_command_reports_rates(model, tmp_path, capsys):
    """`dvi bench-learner` end to end on the tiny model (its numbers are for SmolLM2; here only the report)."""
    from dvi.cli import main

    model.save_pretrained(tmp_path / "model")
    cfg = config(tmp_path, "redis://unused:1")
    (tmp_path / "learner.yaml").write_text(json.dumps(cfg.model_dump(mode="json", exclude={"redis"})))
    assert main(["bench-learner", "--config", str(tmp_path / "learner.yaml"), "--layouts", "1x1", "--steps", "6",
                 "--warmup", "1", "--generation-prompts", "0", "--out", str(tmp_path / "bench.json")]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    rates = report["learner"]["1x1"]
    assert rates["steps_per_s"] > 0 and rates["positions_per_s"] == pytest.approx(4 * rates["transitions_per_s"], rel=0.01)
    assert rates["versions"] >= 2 and rates["blob_mb"] > 0 and rates["commit_s"] is not None
    assert "1x1" in capsys.readouterr().out
