"""`dvi drift` (dvi/studies/drift*.py, dvi/report/drift.py): the recovery measure, per-phase numbers from a
small requests.jsonl, the arms' run configs, config errors, the offline arm's prompts, the study loop with the
runner stubbed, and the report of a synthetic study directory. No Ray, Redis or real model."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import yaml

from dvi import cli
from dvi.config import ConfigError, cli_overrides, load_config
from dvi.report.drift import PLOT_FILES, write_drift_report
from dvi.studies.drift_analysis import analyze_arm, plateau, recovery, trace_phases
from dvi.studies.drift_config import ARMS, DriftConfig, arm_config
from run_fixtures import assert_png

REPO = Path(__file__).resolve().parents[2]
PHASES = ("chat", "code", "math", "translation")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _base(**over) -> dict:
    data = {"out_dir": "runs/x", "trace": {"make": {
        "n": 8, "max_new_tokens": 16, "sources": [{"kind": "builtin", "limit": 28}],
        "schedule": {"kind": "phases", "phases": [{"workload": "chat", "requests": 4},
                                                  {"workload": "code", "requests": 4}]}}}}
    data.update(over)
    return data


def _config(tmp_path: Path, data: dict, overrides: dict | None = None) -> DriftConfig:
    path = tmp_path / "drift.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(DriftConfig, path, overrides)


# ---------------------------------------------------------------- recovery and phases


def test_recovery_counts_requests_until_the_rolling_mal_reaches_the_target():
    series = [1.0, 1.2, 1.8, 2.0, 2.0]
    # target 0.9 * 2.0 = 1.8; rolling of 2: 1.0, 1.1, 1.5, 1.9 -> the 4th request
    assert recovery(series, 2.0, 0.9, 2) == 4
    assert recovery(series, 2.0, 0.9, 1) == 3  # no smoothing: the 3rd request itself
    assert recovery(series, 2.0, 0.9, 10) is None  # the window mean never gets there within the phase
    assert recovery([1.9, 1.0, 1.0], 2.0, 0.9, 3) == 1  # recovers at once: the first request already does
    assert recovery([1.0] * 6, 2.0, 0.9, 2) is None  # never recovers
    assert recovery([1.8], 2.0, 0.9, 4) == 1  # exactly at the target counts
    assert recovery([], 2.0, 0.9, 2) is None and recovery([2.0], None, 0.9, 2) is None


def test_plateau_is_the_mean_of_the_phase_tail():
    assert plateau([1.0, 2.0, 3.0, 4.0], 0.5) == 3.5
    assert plateau([1.0, 2.0, 3.0, 4.0], 0.01) == 4.0  # at least one request
    assert plateau([1.0, 3.0], 1.0) == 2.0
    assert plateau([], 0.5) is None


def test_phases_are_consecutive_runs_of_a_workload_in_trace_order():
    trace = [{"request_id": f"r{i}", "workload": w} for i, w in enumerate(["chat", "chat", "code", "chat", "chat"])]
    phases = trace_phases(trace)
    assert [(p.workload, p.request_ids, p.start) for p in phases] == [
        ("chat", ["r0", "r1"], 0), ("code", ["r2"], 2), ("chat", ["r3", "r4"], 3)]


def _record(rid, workload, sent, done, mal, tokens=10, decode_s=1.0, ok=True):
    return {"request_id": rid, "workload": workload, "arrival_s": sent, "sent_s": sent, "done_s": done, "ok": ok,
            "tokens": tokens if ok else None, "tokens_per_s": tokens / decode_s if ok else None,
            "mean_accepted_length": mal if ok else None}


def test_per_phase_numbers_from_a_small_requests_file(tmp_path):
    trace = [{"request_id": f"r{i}", "workload": "chat" if i < 4 else "code"} for i in range(8)]
    records = [  # written in completion order of a replay, not trace order
        _record("r0", "chat", 0.0, 1.0, 1.0, tokens=10, decode_s=1.0),
        _record("r1", "chat", 0.0, 3.0, 2.0, tokens=20, decode_s=1.0),
        _record("r2", "chat", 1.0, 2.0, 2.0, tokens=10, decode_s=2.0),  # done before r1
        _record("r3", "chat", 2.0, 4.0, 3.0, tokens=30, decode_s=1.0),
        _record("r4", "code", 3.5, 5.0, 1.0),  # the shift: first code request sent at 3.5
        _record("r5", "code", 4.0, 6.0, 0.0, ok=False),  # failed: no MAL, left out of the series
        _record("r6", "code", 5.0, 7.0, 2.2),
        _record("r7", "code", 6.0, 8.0, 2.6),
        _record("zz", "code", 6.0, 9.0, 9.9),  # not in the trace: ignored
    ]
    _jsonl(tmp_path / "requests.jsonl", records)
    from dvi.report.format import read_jsonl

    arm = analyze_arm(read_jsonl(tmp_path / "requests.jsonl"), trace_phases(trace), recovery_fraction=0.9,
                      plateau_fraction=0.5, rolling=2)
    s = arm.summary()
    assert s["phase_mal"] == pytest.approx([2.0, (1.0 + 2.2 + 2.6) / 3])
    assert s["phase_tokens_per_s"] == pytest.approx([70 / 5.0, 10.0])  # tokens over decoding seconds
    assert s["phase_completed"] == [4, 3]
    # chat by completion: 1.0, 2.0 (r2), 2.0 (r1), 3.0 -> plateau = mean of the last half = 2.5, target 2.25
    assert s["phase_plateau"][0] == pytest.approx(2.5)
    # code rolling(2): 1.0, 1.6, 2.4 -> recovered at its 3rd completed request, r7, done at 8.0
    assert s["recovery_requests"] == [3]
    assert s["recovery_seconds"] == [pytest.approx(8.0 - 3.5)]
    xs, ys = arm.curve()
    assert xs == [1, 2, 3, 4, 5, 6, 7] and ys[4:] == pytest.approx([1.0, 1.6, 2.4])
    assert arm.recovery_points() == [(7, pytest.approx(2.4))]


# ---------------------------------------------------------------- configs


def test_the_shipped_config_loads_and_builds_every_arm():
    cfg = load_config(DriftConfig, REPO / "configs" / "drift.yaml")
    assert cfg.arms == list(ARMS) and cfg.recovery_fraction == 0.9
    assert cfg.trace.make.schedule.kind == "phases" and len(cfg.trace.make.schedule.phases) >= 2
    runs = {arm: arm_config(cfg, arm, "study") for arm in cfg.arms}
    for arm, run in runs.items():
        assert run.out_dir == str(Path("study") / "arms" / arm)
        assert run.trace.path == str(Path("study") / "trace.jsonl") and run.trace.make is None
        assert (run.model, run.exit_layer, run.head, run.seed) == (cfg.model, cfg.exit_layer, cfg.head, cfg.seed)
        assert run.actors.count == cfg.actors.count and run.learner.batch_size == cfg.learner.batch_size
    assert len({r.run_id for r in runs.values()}) == 5 and runs["online_kl"].run_id == "drift-online_kl"
    assert not runs["frozen_untrained"].learn and runs["frozen_untrained"].actors.head_path is None
    assert not runs["frozen_offline"].learn
    assert runs["frozen_offline"].actors.head_path == str(Path("study") / "offline" / "head")
    assert runs["online_kl"].learn and runs["online_kl"].learner.schedule == "kl_only"
    assert runs["online_kl"].actors.head_path is None
    assert runs["online_kl_rl"].learn and runs["online_kl_rl"].learner.schedule == "kl_rl"
    memory = runs["online_kl_rl_memory"]
    assert memory.learn and memory.learner.schedule == "kl_rl" and memory.actors.memory == "shared"
    assert {r.actors.memory for arm, r in runs.items() if arm != "online_kl_rl_memory"} == {"off"}
    assert arm_config(cfg, "frozen_offline", "s", offline_head="h").actors.head_path == "h"
    with pytest.raises(ValueError, match="unknown arm"):
        arm_config(cfg, "bogus")


def test_the_resolved_config_loads_back_and_overrides_apply(tmp_path):
    cfg = _config(tmp_path, _base(), cli_overrides(["rolling=6", "offline.epochs=2"], {"out_dir": "o"}, "x=1"))
    assert (cfg.rolling, cfg.offline.epochs, cfg.out_dir) == (6, 2, "o")
    again = _config(tmp_path, cfg.resolved())
    assert again == cfg


@pytest.mark.parametrize("change, key", [
    ({"learn": False}, "learn"),
    ({"actors": {"head_path": "heads/x"}}, "actors.head_path"),
    ({"actors": {"memory": "shared"}}, "actors.memory"),
    ({"learner": {"schedule": "kl_only"}}, "learner.schedule"),
    ({"arms": ["frozen_untrained", "bogus"]}, "arms"),
    ({"arms": ["online_kl", "online_kl"]}, "arms"),
    ({"recovery_fraction": 0}, "recovery_fraction"),
    ({"plateau_fraction": 1.5}, "plateau_fraction"),
    ({"rolling": 0}, "rolling"),
    ({"offline": {"epochs": 0}}, "offline.epochs"),
    ({"offline": {"epoch": 3}}, "offline.epoch"),
    ({"recover_fraction": 0.8}, "recover_fraction"),
    ({"actors": {"model": "m"}}, "actors.model"),
])
def test_config_errors_name_the_key(tmp_path, change, key):
    data = _base()
    data.update(change)
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, data)
    message = str(err.value)
    assert key in message and "\n" not in message


def test_a_trace_without_phases_is_refused(tmp_path):
    data = _base()
    data["trace"]["make"]["schedule"] = {"kind": "uniform"}
    with pytest.raises(ConfigError, match=r"trace\.make\.schedule.*phases"):
        _config(tmp_path, data)
    data["trace"]["make"]["schedule"] = {"kind": "phases", "phases": [{"workload": "chat", "requests": 4}]}
    with pytest.raises(ConfigError, match="at least two phases"):
        _config(tmp_path, data)


# ---------------------------------------------------------------- the offline arm's prompts


def test_offline_prompts_are_the_first_phase_with_an_unserved_prompt_held_out(tmp_path):
    from dvi.studies.drift import offline_config, study_trace, write_offline_prompts
    from selfspec.prompts import BUILTIN, load_prompts

    cfg = _config(tmp_path, _base(out_dir=str(tmp_path / "study")))
    (tmp_path / "study").mkdir()
    requests = study_trace(cfg, tmp_path / "study")
    phases = trace_phases([r.to_dict() for r in requests])
    out = tmp_path / "study" / "offline" / "prompts.jsonl"
    assert write_offline_prompts(cfg, requests, phases, out) == (4, 1)
    prompts = load_prompts(str(out))
    assert [p.text for p in prompts] == BUILTIN["chat"][:4] + [BUILTIN["chat"][4]]  # chat-4: past the limit
    online = offline_config(cfg, out, 4, 1, 16)
    assert (online.workload, online.train_prompts, online.heldout_prompts) == (str(out), 4, 1)
    assert (online.model, online.exit_layer, online.head) == (cfg.model, cfg.exit_layer, cfg.head)
    assert (online.schedule, online.epochs, online.max_new_tokens) == ("kl_only", cfg.offline.epochs, 16)


def test_offline_prompts_from_a_trace_file_hold_out_the_phase_tail(tmp_path):
    from dvi.studies.drift import study_trace, write_offline_prompts

    rows = [{"arrival_s": 0.0, "request_id": f"r{i}", "workload": "a" if i < 3 else "b", "prompt": f"text {i}",
             "max_new_tokens": 8, "temperature": 0.0} for i in range(5)]
    _jsonl(tmp_path / "t.jsonl", rows)
    cfg = _config(tmp_path, _base(out_dir=str(tmp_path / "s"), trace={"path": str(tmp_path / "t.jsonl")}))
    (tmp_path / "s").mkdir()
    requests = study_trace(cfg, tmp_path / "s")
    assert (tmp_path / "s" / "trace.jsonl").read_text() == (tmp_path / "t.jsonl").read_text()
    phases = trace_phases([r.to_dict() for r in requests])
    out = tmp_path / "p.jsonl"
    assert write_offline_prompts(cfg, requests, phases, out) == (2, 1)
    assert [json.loads(line)["turns"] for line in out.read_text().splitlines()] == [["text 0"], ["text 1"], ["text 2"]]
    cfg.offline.heldout_prompts = 3
    with pytest.raises(ValueError, match="heldout_prompts 3"):
        write_offline_prompts(cfg, requests, phases, out)


# ---------------------------------------------------------------- the study loop, the runner stubbed


def _fake_run(cfg, overwrite=False, progress=True):
    """What dvi.run.runner.run leaves, without Ray: requests whose MAL drops at each shift and climbs back
    when the arm learns."""
    from dvi.run.runner import load_trace, prepare_run_dir

    run_dir = prepare_run_dir(cfg, overwrite)
    if cfg.run_id.startswith("crashes"):
        raise RuntimeError("boom")
    requests = load_trace(cfg, run_dir).requests
    records, t, last, k = [], 0.0, None, 0
    for r in requests:
        k = 0 if r.workload != last else k + 1
        last = r.workload
        mal = 1.1 + (0.2 * k if cfg.learn else 0.0) + (0.5 if cfg.actors.head_path and r.workload == "chat" else 0)
        records.append(_record(r.request_id, r.workload, t, t + 1.0, mal, tokens=16, decode_s=0.5))
        t += 1.0
    _jsonl(run_dir / "requests.jsonl", records)
    summary = {"wall_s": t, **({"mal_first_window": 1.05, "mal_last_window": 1.3} if cfg.learn else {})}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir, summary


def _fake_offline(cfg, drift_dir, requests, phases):
    from dvi.studies.drift import write_offline_prompts

    write_offline_prompts(cfg, requests, phases, drift_dir / "offline" / "prompts.jsonl")
    head = drift_dir / "offline" / "head"
    head.mkdir(parents=True)
    (head / "head.json").write_text("{}")
    return head


def test_the_study_runs_each_arm_on_one_trace_and_summarizes(tmp_path, monkeypatch):
    import dvi.run.runner
    import dvi.studies.drift
    from dvi.studies.drift import run_drift

    monkeypatch.setattr(dvi.run.runner, "run", _fake_run)
    monkeypatch.setattr(dvi.studies.drift, "train_offline_head", _fake_offline)
    cfg = _config(tmp_path, _base(out_dir=str(tmp_path / "study")))
    drift_dir, summary = run_drift(cfg, progress=False, say=lambda line: None)
    assert summary["phases"] == ["chat", "code"] and summary["arms_run"] == list(ARMS)
    arms = summary["arms"]
    assert set(arms) == set(ARMS) and not summary["arms_failed"]
    for arm in ARMS:
        assert (drift_dir / "arms" / arm / "trace.jsonl").read_text() == (drift_dir / "trace.jsonl").read_text()
        assert (drift_dir / "arms" / arm / "report.md").is_file()  # each arm's own run report
        assert len(arms[arm]["phase_mal"]) == 2 and len(arms[arm]["recovery_requests"]) == 1
    assert arms["frozen_offline"]["phase_mal"][0] == pytest.approx(1.6)
    assert arms["online_kl"]["heldout_mal_last"] == 1.3 and arms["frozen_untrained"]["heldout_mal_last"] is None
    # learning: 1.1, 1.3, 1.5, 1.7 -> plateau 1.6, target 1.44; rolling(4) 1.1, 1.2, 1.3, 1.4 -> never
    assert arms["online_kl"]["recovery_requests"] == [None]
    assert arms["frozen_untrained"]["recovery_requests"] == [1]  # flat: recovered at once
    saved = json.loads((drift_dir / "summary.json").read_text())
    assert saved["arms"] == json.loads(json.dumps(arms)) and saved["config"]["rolling"] == 4
    assert saved["versions"]["transformers"]  # the package versions (selfspec.versions)
    assert load_config(DriftConfig, drift_dir / "config.yaml") == cfg  # rerun from the directory alone
    assert "frozen_offline" in (drift_dir / "report.md").read_text()

    with pytest.raises(FileExistsError, match="--overwrite"):
        run_drift(cfg, progress=False, say=lambda line: None)
    # resume: finished arms are kept, a missing one runs; a crashing arm is recorded, the rest go on
    import shutil

    shutil.rmtree(drift_dir / "arms" / "online_kl")
    cfg2 = cfg.model_copy(update={"run_id": "crashes"})
    seen = []
    _, again = run_drift(cfg2, arms=["online_kl", "frozen_untrained"], resume=True, progress=False, say=seen.append)
    assert any("finished before" in line for line in seen)
    assert again["arms_failed"] == {"online_kl": "RuntimeError: boom"} and again["arms_run"] == []


# ---------------------------------------------------------------- the report


def make_drift_dir(out: Path, per_phase: int = 12, seed: int = 0, missing: str | None = "online_kl_rl") -> Path:
    """A study directory as `dvi drift` writes it, four phases; `missing`: an arm that did not run."""
    rng = random.Random(seed)
    trace = [{"request_id": f"r{i:05d}", "workload": PHASES[i // per_phase]} for i in range(per_phase * len(PHASES))]
    _jsonl(out / "trace.jsonl", trace)
    (out / "config.yaml").write_text(yaml.safe_dump({"rolling": 3, "recovery_fraction": 0.9,
                                                     "plateau_fraction": 0.5, "arms": list(ARMS)}))
    base = {"chat": 1.3, "code": 1.6, "math": 1.2, "translation": 1.1}
    for arm in ARMS:
        if arm == missing:
            continue
        records, t = [], 0.0
        for i, row in enumerate(trace):
            k, w = i % per_phase, row["workload"]
            if arm == "frozen_untrained":
                mal = base[w] - 0.2
            elif arm == "frozen_offline":
                mal = base[w] + (0.6 if w == "chat" else -0.1)
            else:
                mal = base[w] - 0.15 + 0.6 * (1 - math.exp(-k / 3)) + 0.2 * (i / len(trace))
            mal += rng.gauss(0, 0.04)
            ok = i != 5
            records.append(_record(row["request_id"], w, t, t + 1.5 + rng.random(), mal,
                                   tokens=48, decode_s=48 / (40 * mal), ok=ok))
            t += 1.0
        rng.shuffle(records)  # requests.jsonl is in completion order; the analysis sorts by done_s
        _jsonl(out / "arms" / arm / "requests.jsonl", records)
        learned = arm.startswith("online")
        (out / "arms" / arm / "summary.json").write_text(json.dumps(
            {"wall_s": t, **({"mal_first_window": 1.05, "mal_last_window": 1.42} if learned else {})}))
    return out


def test_the_report_of_a_synthetic_study(tmp_path):
    make_drift_dir(tmp_path)
    report = write_drift_report(tmp_path)
    text = report.read_text()
    for arm in ARMS:
        assert f"`{arm}`" in text, arm
    assert "online_kl_rl` (not run)" in text
    for workload in PHASES:
        assert workload in text
    for name in PLOT_FILES.values():
        assert f"](plots/{name})" in text
        assert_png(tmp_path / "plots" / name)
    assert "plotting failed" not in text and "1.420" in text  # the learning arm's held-out MAL
    assert "| `frozen_untrained` | 1. chat | 11/12 |" in text and "| 2. code | 12/12 |" in text


def test_dvi_report_and_report_only_dispatch_on_a_study_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich's table at a fixed width
    make_drift_dir(tmp_path, missing=None)
    assert cli.main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text().startswith("# Drift study")
    (tmp_path / "report.md").unlink()
    assert cli.main(["drift", "--report-only", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "report.md").is_file() and "online_kl_rl" in out and "translation" in out
