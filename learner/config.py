"""Typed settings of the learner, and the DeepSpeed JSON it references.

The learner YAML holds what the learner decides (head, schedule, losses, optimizer, batch, publishing,
checkpoints, placement) and reuses the buffer's sections (`redis`, `stream`, `weights`). The keys every
model-side part has (model, exit_layer, head, gamma) come from selfspec.config.ModelSideConfig. The DeepSpeed
JSON holds only what DeepSpeed decides (ZeRO stage, clipping, bucket sizes): the optimizer is the
learner's (torch AdamW, so nothing compiles), and so is the precision (`precision`), because fp32 vs
bf16 depends on the machine the rank lands on.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from buffer.config import RedisConfig, StreamConfig, WeightsConfig
from selfspec.config import ModelSideConfig, ScheduleName, Strict, TrainingConfig


class HeldoutConfig(Strict):
    """Prompts no actor serves: each published version's MAL on their greedy paths is the learning curve."""
    workload: str = Field("builtin", description="builtin, humaneval, or a Spec-Bench JSONL path")
    prompts: int = Field(7, ge=0, description="taken from the end of the workload; 0: no held-out score")
    max_new_tokens: int = Field(128, ge=2, description="length of each held-out greedy path, in tokens")
    collect_batch: int = Field(8, ge=1, description="batch size of greedy generation (paths are cached)")


class CheckpointConfig(Strict):
    """DeepSpeed checkpoints: a restarted learner resumes from the last one."""
    dir: str | None = Field(None, description="DeepSpeed checkpoints; default: {out_dir}/checkpoints")
    every_steps: int = Field(100, ge=1, description="checkpoint every this many optimizer steps")
    every_s: float = Field(20.0, gt=0, description="also checkpoint this often: acknowledgements wait for it")


class PlacementConfig(Strict):
    """Where the learner's data-parallel ranks run."""
    ranks: int = Field(1, ge=1, description="data-parallel ranks; more than 1 runs them as Ray actors")
    num_cpus: float = Field(1, gt=0, description="Ray CPUs per rank (and torch threads)")
    num_gpus: float = Field(0, ge=0, description="Ray GPUs per rank")


class LearnerConfig(TrainingConfig, ModelSideConfig):
    """The DeepSpeed learner: reads transitions from the stream, trains the head, publishes versions."""
    # Not dvi online's kl_rl: live, the cost-aware policy lets the head draft in a few % of positions, so the
    # RL terms have almost no on-policy rows, and once kl_rl's KL weight falls to its floor the head drifts
    # (held-out MAL 1.20 -> 1.12 over 250 Spec-Bench requests; kl_only reached 1.24: docs/distributed.md).
    schedule: ScheduleName = Field("kl_only", description="loss schedule by learner step: kl_only (the verifier's "
                                                          "distribution on every served row), kl_rl, ce_only or "
                                                          "pg_only")
    run_id: str = Field("default", description="the run's Redis keys live under dvi:{run_id}:")
    draft_vocab_from: Literal["lowest", "served"] = Field(
        "lowest", description="with head.draft_vocab: the lowest ids (BPE merge order), or the ids the verifier "
                              "emits most in the first `vocab_tokens` served positions, the rest by lowest id")
    vocab_tokens: int = Field(2048, ge=1, description="served positions counted before the head is built "
                                                      "(draft_vocab_from: served); the actors serve meanwhile")
    deepspeed: str = Field("configs/deepspeed/zero1.json", description="DeepSpeed JSON (ZeRO stage 0, 1 or 2)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on a GPU that has it, else fp32")
    batch_size: int = Field(64, ge=1, description="transitions per optimizer step, over all ranks")
    min_fill: float = Field(0.25, gt=0, le=1, description="after fill_timeout_s, step with this fraction of a batch")
    fill_timeout_s: float = Field(2.0, ge=0, description="seconds to wait for a full batch before stepping with "
                                                         "min_fill of one")
    reuse: int = Field(1, ge=1, description="optimizer steps on each batch (1: every transition used once)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps; null: run until "
                                                          "stopped (SIGTERM, the run's stop key or idle_exit_s)")
    idle_exit_s: float | None = Field(None, gt=0, description="stop after this many seconds without a transition")
    publish_every_steps: int = Field(10, ge=1, description="publish a new head version every this many optimizer "
                                                           "steps")
    publish_every_s: float = Field(30.0, gt=0, description="... or when this many seconds passed since the last "
                                                           "version and it has trained since, whichever comes first")
    publish_gate: float | None = Field(
        0.02, ge=0, description="hold a version back (not published) when its held-out MAL is more than this below "
                                "the best version published so far; null: publish every version")
    save_heads: bool = Field(True, description="also save every published version to out_dir/heads/vNNNN")
    heldout: HeldoutConfig = Field(HeldoutConfig(), description="the prompts every published version is scored on")
    checkpoint: CheckpointConfig = Field(CheckpointConfig(), description="when and where to checkpoint")
    out_dir: str = Field("runs/learner", description="output directory: metrics.jsonl, tb/, versions.jsonl, "
                                                     "checkpoints/, heads/")
    placement: PlacementConfig = Field(PlacementConfig(), description="how many ranks, and their Ray resources")
    redis: RedisConfig = Field(RedisConfig(), description="the Redis server the actors write to (the learner never "
                                                          "starts one: give url)")
    stream: StreamConfig = Field(StreamConfig(), description="how the learner reads the transition stream")
    weights: WeightsConfig = Field(WeightsConfig(), description="the published versions kept in Redis")
    seed: int = Field(0, description="seed of the head's initialisation")

    @model_validator(mode="after")
    def _acks_wait_less_than_a_claim(self):
        # Trained entries stay pending until the next checkpoint; another rank would claim (and train
        # again) what stayed pending longer than claim_idle_ms.
        if self.checkpoint.every_s * 1000 * 2 > self.stream.claim_idle_ms:
            raise ValueError(f"checkpoint.every_s {self.checkpoint.every_s:g} must be under half of "
                             f"stream.claim_idle_ms ({self.stream.claim_idle_ms} ms): batches stay unacknowledged "
                             "until the checkpoint that holds them")
        return self

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.out_dir) / "checkpoints"


class DeepSpeedConfigError(ValueError):
    pass


# Keys the learner owns: DeepSpeed would otherwise build a second optimizer or change the batch meaning.
_OWNED = {"optimizer": "the optimizer is torch AdamW from the learner config (lr, weight_decay)",
          "train_batch_size": "one optimizer step per learner batch (batch_size in the learner config)",
          "gradient_accumulation_steps": "one optimizer step per learner batch (batch_size in the learner config)",
          "train_micro_batch_size_per_gpu": "one optimizer step per learner batch (batch_size in the learner config)",
          "fp16": "precision is the learner config's `precision` (fp32 or bf16)",
          "bf16": "precision is the learner config's `precision` (fp32 or bf16)"}


def deepspeed_config(path: str | Path, bf16: bool) -> dict:
    """The DeepSpeed config dict for the engine: the JSON file plus what the learner owns. Any problem
    is a DeepSpeedConfigError of one line naming the file and the key."""
    path = Path(path)
    where = f"deepspeed config {path}"
    if not path.is_file():
        raise DeepSpeedConfigError(f"{where} not found (learner key `deepspeed`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(f"{where}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise DeepSpeedConfigError(f"{where}: expected a JSON object at the top level")
    for key, why in _OWNED.items():
        if key in data:
            raise DeepSpeedConfigError(f"{where}: remove `{key}`: {why}")
    stage = data.get("zero_optimization", {}).get("stage", 0) if isinstance(data.get("zero_optimization"), dict) else 0
    if stage not in (0, 1, 2):
        raise DeepSpeedConfigError(f"{where}: zero_optimization.stage must be 0, 1 or 2 (got {stage!r}): stage 3 "
                                   "partitions the parameters, which scoring and publishing read whole")
    clip = data.get("gradient_clipping", 1.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise DeepSpeedConfigError(f"{where}: gradient_clipping must be a number >= 0 (got {clip!r})")
    full = {**data, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "bf16": {"enabled": bf16}, "steps_per_print": data.get("steps_per_print", 10**9)}
    _validate_with_deepspeed(full, where)
    return full


def _validate_with_deepspeed(config: dict, where: str) -> None:
    """DeepSpeed's own checks (pydantic sections such as zero_optimization), as one line."""
    from pydantic import ValidationError

    from learner.dist import env_defaults

    env_defaults()
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(config)
    except ValidationError as err:
        first = err.errors()[0]
        section = {"DeepSpeedZeroConfig": "zero_optimization"}.get(err.title, err.title)
        key = ".".join([section, *(str(p) for p in first["loc"])])
        raise DeepSpeedConfigError(f"{where}: {key}: {first['msg']}") from None
    except (AssertionError, ValueError, TypeError, KeyError) as err:
        raise DeepSpeedConfigError(f"{where}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
