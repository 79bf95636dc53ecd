"""`dvi learner` as a process: killed mid-run and resumed, stopped by SIGTERM and resumed, its stream
drains with every transition trained exactly once; bad configs and an unreachable Redis are one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from learner_data import REPO, K, greedy_paths, rounds, save_model, verifier, write

from buffer.keys import GROUP, RunKeys
from buffer.stream import run_stats
from buffer.weights import WeightStore
from dvi.cli import main
from learner.dist import free_port
from selfspec.drafter import DrafterHead, HeadConfig
from selfspec.split import SplitModel

DVI = [sys.executable, "-m", "dvi.cli", "learner"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def learner_yaml(tmp, url: str, **extra) -> str:
    data = {"run_id": "resume", "model": str(tmp / "model"), "exit_layer": K,
            "deepspeed": str(REPO / "configs/deepspeed/zero1.json"),
            "head": {"adapter_hidden": 128, "lora_rank": 8}, "lr": 3e-3, "batch_size": 8, "min_fill": 0.01,
            "fill_timeout_s": 0.2, "publish_every_steps": 7, "heldout": {"prompts": 0},
            "checkpoint": {"every_steps": 10}, "out_dir": str(tmp / "out"), "redis": {"url": url},
            "stream": {"frame_size": 4, "read_block_ms": 100}, **extra}
    path = tmp / "learner.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def wait_for_step(out, step: int, proc, timeout_s: float = 120) -> int:
    """The learner's last logged step once it reached `step`."""
    deadline = time.monotonic() + timeout_s
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the learner exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}"
        if metrics.exists():
            steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.02)
    raise AssertionError(f"the learner did not reach step {step} in {timeout_s}s")


def test_killed_and_resumed_learner_trains_every_transition_once(redis_server, redis_client, tmp_path):
    model = verifier()
    save_model(model, tmp_path / "model")
    paths = greedy_paths(model, 40)
    torch.manual_seed(0)
    sent = [t for p in paths for t in rounds(p, DrafterHead(SplitModel(model, K), HeadConfig(adapter_hidden=128,
                                                                                           lora_rank=8)), run_id="resume")]
    write(redis_client, "resume", sent)
    cfg = learner_yaml(tmp_path, redis_server.url)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def start(*flags):
        return subprocess.Popen([*DVI, "--config", cfg, *flags], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    first = start()
    wait_for_step(out, 25, first)  # past two checkpoints, between two others
    first.send_signal(signal.SIGKILL)
    first.wait()
    versions_killed = [json.loads(line)["version"] for line in (out / "versions.jsonl").read_text().splitlines()]

    second = start("--resume")
    reached = wait_for_step(out, 60, second)
    second.send_signal(signal.SIGTERM)  # finish the step, publish, checkpoint, acknowledge, exit
    _, err = second.communicate(timeout=60)
    assert second.returncode == 0, err[-2000:]
    latest = (out / "checkpoints" / "latest").read_text()
    assert int(latest.split("-")[0].removeprefix("step")) >= reached  # the SIGTERM checkpoint, not an older one

    third = start("--resume", "--set", "idle_exit_s=1")
    stdout, err = third.communicate(timeout=120)
    assert third.returncode == 0, err[-2000:]
    summary = json.loads(stdout[stdout.index("{\n"):])  # DeepSpeed prints a line of its own before it

    versions = [json.loads(line)["version"] for line in (out / "versions.jsonl").read_text().splitlines()]
    assert versions == sorted(set(versions)) and len(versions) > len(versions_killed), "no version number reused"
    assert WeightStore(redis_client, "resume").latest_version() == versions[-1] == summary["version"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("event") == "resume" for r in records) == 2
    # none lost: every transition written was consumed (acknowledged) ...
    keys = RunKeys("resume")
    assert run_stats(redis_client, "resume") == {"written": len(sent), "consumed": len(sent)}
    assert redis_client.xlen(keys.transitions) == 0 and redis_client.xpending(keys.transitions, GROUP)["pending"] == 0
    # ... and none trained twice: the surviving lineage trained exactly as many as were written
    counters = summary["counters"]
    assert counters["trained_transitions"] == counters["consumed"] == len(sent)
    assert counters["steps"] == summary["step"] >= len(sent) // 8


@pytest.mark.parametrize("flags,message", [
    (["--set", "batch_sise=3"], "batch_sise: Extra inputs are not permitted"),
    (["--set", "min_fill=2"], "min_fill: Input should be less than or equal to 1"),
    (["--set", "checkpoint.every_s=100"], "checkpoint.every_s 100 must be under half of stream.claim_idle_ms"),
    (["--set", "deepspeed=DIR/z3.json"], "zero_optimization.stage must be 0, 1 or 2"),
    (["--set", "deepspeed=DIR/typo.json"], "zero_optimization.stagee: Extra inputs are not permitted"),
    (["--set", "deepspeed=DIR/opt.json"], "remove `optimizer`: the optimizer is torch AdamW"),
    (["--set", "deepspeed=DIR/broken.json"], "not valid JSON"),
    (["--set", "deepspeed=DIR/none.json"], "none.json not found (learner key `deepspeed`)"),
    (["--redis-url", "redis://127.0.0.1:PORT"], "no redis server at redis://127.0.0.1:PORT (connection refused)"),
])
def test_errors_are_one_line(tmp_path, capsys, flags, message):
    for name, text in {"z3": '{"zero_optimization": {"stage": 3}}', "typo": '{"zero_optimization": {"stagee": 1}}',
                       "opt": '{"optimizer": {"type": "Adam"}}', "broken": '{"zero_optimization": '}.items():
        (tmp_path / f"{name}.json").write_text(text)
    port = str(free_port())
    flags = [f.replace("DIR", str(tmp_path)).replace("PORT", port) for f in flags]
    message = message.replace("PORT", port)
    # the shipped config holds out Spec-Bench questions; these errors must not depend on having them
    shipped = ["--config", str(REPO / "configs/learner.yaml"), "--set", f"deepspeed={REPO}/configs/deepspeed/zero1.json",
               "--set", "heldout.workload=builtin", "--set", "heldout.prompts=7"]
    assert main(["learner", *shipped, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dvi learner: error: ") and message in err and err.count("\n") == 1, err


def test_exit_code_of_the_real_command(tmp_path):
    (tmp_path / "bad.yaml").write_text("batch_size: -1\n")
    proc = subprocess.run([*DVI, "--config", str(tmp_path / "bad.yaml")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"dvi learner: error: {tmp_path / 'bad.yaml'}: batch_size: "
                                                "Input should be greater than or equal to 1"]
