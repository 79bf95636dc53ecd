"""Typed settings of `dvi drift` (configs/drift.yaml): a base run config plus the study's own keys.

The base is a `dvi run` config (the same keys as `dvi.run.config.RunConfig`: model, head, actors, learner,
trace, ...). Every arm replays the same trace with the same seed; what differs per arm is set by the study
and may not be set in the base (one clear error naming the key):

    arm                  learn   actors.head_path                               learner.schedule  actors.memory
    frozen_untrained     false   None (the untrained head of config `head`)   -                 off
    frozen_offline       false   {out_dir}/offline/head (trained offline on   -                 off
                                 the first phase's prompts, `dvi online`)
    online_kl            true    None (the learner's version 0)               kl_only           off
    online_kl_rl         true    None                                         kl_rl             off
    online_kl_rl_memory  true    None                                         kl_rl             shared

Arm `a` runs in `{out_dir}/arms/a` from `{out_dir}/trace.jsonl`, with run id `{study}-{a}` (the study's
run_id, else its directory's name), so arms sharing an external Redis never share keys.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from dvi.run.config import RUN_OWNED, RunConfig
from selfspec.config import ScheduleName, Strict

ArmName = Literal["frozen_untrained", "frozen_offline", "online_kl", "online_kl_rl", "online_kl_rl_memory"]
ARMS: dict[str, dict] = {  # arm -> what it sets (head_path: "offline" is the study's offline-trained head)
    "frozen_untrained": {"learn": False, "head_path": None, "schedule": None, "memory": "off"},
    "frozen_offline": {"learn": False, "head_path": "offline", "schedule": None, "memory": "off"},
    "online_kl": {"learn": True, "head_path": None, "schedule": "kl_only", "memory": "off"},
    "online_kl_rl": {"learn": True, "head_path": None, "schedule": "kl_rl", "memory": "off"},
    # the head learns as online_kl_rl does, and every actor also drafts from what all of them served
    "online_kl_rl_memory": {"learn": True, "head_path": None, "schedule": "kl_rl", "memory": "shared"},
}
STUDY_OWNED = (("learn",), ("actors", "head_path"), ("actors", "memory"), ("learner", "schedule"))
STUDY_KEYS = ("arms", "recovery_fraction", "plateau_fraction", "rolling", "offline")


class OfflineConfig(Strict):
    """The `frozen_offline` arm's head: `dvi online` (selfspec.online) on the first phase's prompts only, with
    the run's model, exit layer and head config."""
    schedule: ScheduleName = Field("kl_only", description="loss schedule of the offline training (see `dvi "
                                                          "online`'s schedule)")
    epochs: int = Field(6, ge=1, description="passes over each chunk's transitions")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    batch_size: int = Field(64, ge=1, description="transitions per optimizer step")
    chunk_prompts: int = Field(8, ge=1, description="prompts decoded with one head version")
    heldout_prompts: int = Field(1, ge=1, description="prompts of the first workload scored, never trained on: "
                                                      "ones the trace never serves when its sources have them, "
                                                      "else the last of the first phase's")
    max_new_tokens: int | None = Field(None, ge=2, description="greedy path length; None: the trace's")
    sampled_responses: int = Field(0, ge=0, description="more sampled responses per prompt (KL only)")
    prompt_positions: bool = Field(False, description="also distill on the prompts' positions")
    collect_batch: int = Field(8, ge=1, description="batch size of greedy generation")


class DriftConfig(RunConfig):
    """A drift study: the base run config (out_dir is the study directory) and the keys below."""
    out_dir: str = Field("runs/drift", description="the study directory; arm `a` runs in {out_dir}/arms/a")
    arms: list[ArmName] = Field(list(ARMS), min_length=1, description="run in this order, one after another")
    recovery_fraction: float = Field(0.9, gt=0, le=2, description="recovered: the rolling MAL of a phase "
                                                                  "reaches this fraction of the previous "
                                                                  "phase's plateau")
    plateau_fraction: float = Field(0.5, gt=0, le=1, description="a phase's plateau: the mean MAL of its last "
                                                                 "this fraction of completed requests")
    rolling: int = Field(4, ge=1, description="rolling window of the live MAL, in requests")
    offline: OfflineConfig = Field(OfflineConfig(), description="how the frozen_offline arm's head is trained")

    @model_validator(mode="before")
    @classmethod
    def _study_owns(cls, data):
        if isinstance(data, dict):
            for path in STUDY_OWNED:
                node = data
                for key in path[:-1]:
                    node = node.get(key) if isinstance(node, dict) else None
                if isinstance(node, dict) and path[-1] in node:
                    raise ValueError(f"{'.'.join(path)}: set per arm by the drift study (see `arms`), not in "
                                     "its base config")
        return data

    @field_validator("arms")
    @classmethod
    def _unique(cls, arms):
        if len(set(arms)) != len(arms):
            raise ValueError(f"arms {arms}: each arm at most once")
        return arms

    @model_validator(mode="after")
    def _phases(self):
        make = self.trace.make
        if make is not None and make.schedule.kind != "phases":
            raise ValueError(f"trace.make.schedule: a drift study shifts between workloads, give kind: phases "
                             f"(not {make.schedule.kind})")
        if make is not None and len(make.schedule.phases) < 2:
            raise ValueError("trace.make.schedule.phases: give at least two phases (a shift to measure)")
        return self

    @property
    def study_name(self) -> str:
        return self.run_id or Path(self.out_dir).name

    def resolved(self) -> dict:
        """The config as YAML data that loads back into the same DriftConfig: the keys the run or the study
        own inside `actors:` and `learner:` (and the Redis password) left out."""
        exclude = {"learn": True, "redis": {"password"},
                   "actors": {*RUN_OWNED["actors"], "head_path", "memory"}, "learner": {*RUN_OWNED["learner"], "schedule"}}
        return self.model_dump(mode="json", exclude=exclude)

    def base_run_config(self) -> RunConfig:
        exclude = {**dict.fromkeys(STUDY_KEYS, True), "actors": set(RUN_OWNED["actors"]),
                   "learner": set(RUN_OWNED["learner"])}
        return RunConfig.model_validate(self.model_dump(exclude=exclude))


def arm_config(cfg: DriftConfig, arm: str, drift_dir: str | Path | None = None,
               offline_head: str | Path | None = None) -> RunConfig:
    """The arm's `dvi run` config: the base with out_dir {drift_dir}/arms/{arm}, the study's trace file, its
    own run id and the arm's learn / head_path / schedule. `offline_head` (default {drift_dir}/offline/head)
    is the frozen_offline arm's head."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}: choose from {', '.join(ARMS)}")
    spec = ARMS[arm]
    drift_dir = Path(drift_dir if drift_dir is not None else cfg.out_dir)
    data = cfg.base_run_config().model_dump(exclude={"actors": set(RUN_OWNED["actors"]),
                                                     "learner": set(RUN_OWNED["learner"])})
    data.update(out_dir=str(drift_dir / "arms" / arm), run_id=f"{cfg.study_name}-{arm}", learn=spec["learn"])
    data["trace"] = {**data["trace"], "path": str(drift_dir / "trace.jsonl"), "make": None}
    data["actors"]["head_path"] = (str(offline_head if offline_head is not None else drift_dir / "offline" / "head")
                                 if spec["head_path"] == "offline" else None)
    data["actors"]["memory"] = spec["memory"]
    if spec["schedule"] is not None:
        data["learner"]["schedule"] = spec["schedule"]
    return RunConfig.model_validate(data)
