"""`dvi drift`: how each way of keeping the drafter head serves a trace whose workload shifts.

All arms replay the same trace (made once, saved as {drift_dir}/trace.jsonl) with the same seed, each as a
whole `dvi run` (`dvi.run.runner.run`) in {drift_dir}/arms/<arm> (configs: `dvi.studies.drift_config.arm_config`):

    frozen_untrained  serve only, with the untrained head
    frozen_offline    serve only, with a head trained offline (`dvi online`) on the first phase's prompts
    online_kl         serve and learn, schedule kl_only
    online_kl_rl      serve and learn, schedule kl_rl
    online_kl_rl_memory  the same, and every actor drafts from what all of them served (actors.memory shared)

The arms run one after another on this machine. They share nothing but the trace file and the offline head,
so on a Ray cluster they could run side by side (one `dvi drift --arms A` per arm into the same directory,
then `dvi report DIR`); here they run in sequence. An arm that fails is recorded and the next one runs.

    drift_dir/config.yaml   the resolved study config (rerun: dvi drift --config drift_dir/config.yaml)
    drift_dir/trace.jsonl   the trace every arm replays
    drift_dir/offline/      prompts.jsonl (the first phase's prompts, Spec-Bench format) and head/
    drift_dir/arms/<arm>/   each arm's run directory (requests.jsonl, summary.json, report.md, ...)
    drift_dir/summary.json  per arm and phase: MAL, tokens/s, recovery (dvi/studies/drift_analysis.py)
    drift_dir/report.md     with plots/ (dvi/report/drift.py)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import yaml

from dvi.studies.drift_analysis import Phase, trace_phases
from dvi.studies.drift_config import ARMS, DriftConfig, arm_config
from selfspec.versions import package_versions


def prepare_drift_dir(cfg: DriftConfig, overwrite: bool, resume: bool) -> Path:
    drift_dir = Path(cfg.out_dir)
    if drift_dir.exists() and any(drift_dir.iterdir()) and not resume:
        if not overwrite:
            raise FileExistsError(f"study directory {drift_dir} is not empty: choose another --out-dir, pass "
                                  "--overwrite to replace it, or --resume to run the arms it lacks")
        shutil.rmtree(drift_dir)
    drift_dir.mkdir(parents=True, exist_ok=True)
    (drift_dir / "config.yaml").write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
    return drift_dir


def study_trace(cfg: DriftConfig, drift_dir: Path, reuse: bool = False) -> list:
    """The study's trace, written once to drift_dir/trace.jsonl (made from trace.make, or copied from
    trace.path as it is); returns its good requests. `reuse`: keep a trace.jsonl already there."""
    from actors.trace import read_trace, write_trace
    from actors.traffic import make_trace

    path = drift_dir / "trace.jsonl"
    if not (reuse and path.is_file()):
        if cfg.trace.make is not None:
            write_trace(make_trace(cfg.trace.make), path)
        elif Path(cfg.trace.path).resolve() != path.resolve():
            if not Path(cfg.trace.path).is_file():
                raise FileNotFoundError(f"trace file {cfg.trace.path} not found")
            shutil.copyfile(cfg.trace.path, path)
    requests, _ = read_trace(path)
    return requests


def phase_conversations(requests: list, phase: Phase) -> list[tuple[str, list[str]]]:
    """The phase's distinct conversations in first-appearance order: (source id, user turns), the most turns
    any of its requests carried."""
    ids = set(phase.request_ids)
    out: dict[str, list[str]] = {}
    for r in requests:
        if r.request_id not in ids:
            continue
        turns = [m.content for m in r.messages if m.role == "user"] if r.messages is not None else [r.prompt]
        key = r.source or r.conversation_id or r.request_id
        if len(turns) > len(out.get(key, [])):
            out[key] = turns
    return list(out.items())


def unserved_conversations(cfg: DriftConfig, workload: str, served: set[str]) -> list[list[str]]:
    """The workload's conversations in the trace's sources, their `limit` lifted, that the trace never
    serves (held-out candidates for the offline head); [] for a trace given as a file."""
    if cfg.trace.make is None:
        return []
    from actors.workloads import load_workloads

    sources = [s.model_copy(update={"limit": None}) if getattr(s, "limit", None) is not None else s
               for s in cfg.trace.make.sources]
    return [list(c.turns) for c in load_workloads(sources).get(workload, []) if c.source_id not in served]


def write_offline_prompts(cfg: DriftConfig, requests: list, phases: list[Phase], out: Path) -> tuple[int, int]:
    """The first phase's prompts as a Spec-Bench-format JSONL (training prompts, then the held-out ones at
    the end, as `dvi online` takes them); returns (train, held-out) counts."""
    workload = phases[0].workload
    conversations = phase_conversations(requests, phases[0])
    want = cfg.offline.heldout_prompts
    heldout = unserved_conversations(cfg, workload, {key for key, _ in conversations})[-want:]
    train = [turns for _, turns in conversations]
    if not heldout:  # nothing unserved: hold out the phase's last prompts
        if len(train) <= want:
            raise ValueError(f"offline.heldout_prompts {want}: the first phase ({workload}) has only {len(train)} "
                             "distinct prompts and its sources none it does not serve; lower it")
        train, heldout = train[:-want], train[-want:]
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"question_id": f"{workload}-{i}", "category": workload, "turns": turns}
            for i, turns in enumerate(train + heldout)]
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return len(train), len(heldout)


def offline_config(cfg: DriftConfig, prompts: Path, train: int, heldout: int, max_new_tokens: int):
    """The `dvi online` config of the offline arm's head: the run's model, exit layer and head config."""
    from selfspec.config import OnlineConfig

    o = cfg.offline
    return OnlineConfig(model=cfg.model, workload=str(prompts), train_prompts=train, heldout_prompts=heldout,
                        max_new_tokens=o.max_new_tokens or max(2, max_new_tokens), gamma=max(1, cfg.actors.gamma),
                        exit_layer=cfg.exit_layer, head=cfg.head, schedule=o.schedule, lr=o.lr,
                        batch_size=o.batch_size, epochs=o.epochs, chunk_prompts=o.chunk_prompts,
                        sampled_responses=o.sampled_responses, prompt_positions=o.prompt_positions,
                        collect_batch=o.collect_batch, seed=cfg.seed)


def train_offline_head(cfg: DriftConfig, drift_dir: Path, requests: list, phases: list[Phase]) -> Path:
    """drift_dir/offline/head: a head trained by `dvi online` on the first phase's prompts only."""
    from dvi.studies.online import train_and_report
    from selfspec.model import quiet_transformers

    offline = drift_dir / "offline"
    train, heldout = write_offline_prompts(cfg, requests, phases, offline / "prompts.jsonl")
    first = set(phases[0].request_ids)
    tokens = max(r.max_new_tokens for r in requests if r.request_id in first)
    quiet_transformers()
    train_and_report(offline_config(cfg, offline / "prompts.jsonl", train, heldout, tokens), offline / "head")
    return offline / "head"


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def run_drift(cfg: DriftConfig, *, arms: list[str] | None = None, overwrite: bool = False, resume: bool = False,
              progress: bool = True, say: Callable[[str], None] = print) -> tuple[Path, dict]:
    """Run the study's arms (default cfg.arms) one after another; returns the study directory and its
    summary. `resume`: keep the directory's trace and offline head, skip arms that finished (summary.json)."""
    from dvi.report.drift import write_drift_report
    from dvi.report.run import write_run_report
    from dvi.run.runner import run as run_system
    from dvi.studies.drift_analysis import summarize_study

    arms = list(arms or cfg.arms)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(unknown)}: choose from {', '.join(ARMS)}")
    drift_dir = prepare_drift_dir(cfg, overwrite, resume)
    requests = study_trace(cfg, drift_dir, reuse=resume)
    phases = trace_phases([r.to_dict() for r in requests])
    if len(phases) < 2:
        raise ValueError(f"the trace has {len(phases)} workload phase(s): a drift study needs a shift")
    say("phases: " + " → ".join(f"{p.workload} ×{len(p.request_ids)}" for p in phases))
    failed, ran = {}, []
    for i, arm in enumerate(arms, 1):
        arm_dir = drift_dir / "arms" / arm
        if resume and (arm_dir / "summary.json").is_file():
            say(f"arm {i}/{len(arms)} {arm}: finished before, kept ({arm_dir})")
            continue
        try:
            head = None
            if ARMS[arm]["head_path"] == "offline":
                head = drift_dir / "offline" / "head"
                if not (resume and (head / "head.json").is_file()):
                    say(f"arm {i}/{len(arms)} {arm}: training the offline head on phase 1 ({phases[0].workload})")
                    head = train_offline_head(cfg, drift_dir, requests, phases)
            say(f"arm {i}/{len(arms)} {arm}: {arm_dir}")
            run_system(arm_config(cfg, arm, drift_dir, head), overwrite=True, progress=progress)
            ran.append(arm)
        except Exception as err:  # one failed arm is reported; the others still run
            failed[arm] = _one_line(err)
            say(f"arm {arm} failed: {failed[arm]}")
        if arm_dir.is_dir():
            try:
                write_run_report(arm_dir)
            except Exception as err:  # noqa: BLE001 - its report is a convenience
                say(f"arm {arm}: no report ({_one_line(err)})")
    settings = {"arms": list(dict.fromkeys([*cfg.arms, *arms])), "recovery_fraction": cfg.recovery_fraction,
                "plateau_fraction": cfg.plateau_fraction, "rolling": cfg.rolling}
    summary, _ = summarize_study(drift_dir, settings)
    summary.update(arms_run=ran, arms_failed=failed, config=cfg.resolved(), versions=package_versions())
    (drift_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_drift_report(drift_dir, summary)
    return drift_dir, summary
