"""The drafter's typed settings, free of torch: a command validates a config (and reports a bad value in one
line) before anything heavy is imported.

`Strict` is the base of every config section: an unknown key is an error naming the key. The classes that use
these settings live elsewhere: `DrafterHead` (selfspec.drafter) builds a head from a `HeadConfig`, the
objectives (selfspec.objectives) read `ScheduleConfig` and `LossConfig`, the in-process loop
(selfspec.online) runs an `OnlineConfig`.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from selfspec.defaults import DEFAULT_MODEL


class Strict(BaseModel):
    """A config section: unknown keys are errors (the message names the key)."""
    model_config = ConfigDict(extra="forbid")


class FrozenStrict(Strict):
    """A strict section that is a value once built (specs shared between threads and actors)."""
    model_config = ConfigDict(extra="forbid", frozen=True)


class HeadConfig(Strict):
    adapter_hidden: int = Field(1024, ge=0, description="width of the residual MLP adapter (0: none)")
    lora_rank: int = Field(16, ge=0, description="LoRA rank on the output projection (0: none)")
    lora_alpha: float = Field(32.0, gt=0)
    draft_vocab: int | None = Field(None, ge=16, description="keep only this many output ids (None: full vocab)")
    attention_layers: int = Field(0, ge=0, le=4, description="decoder layers copied from k, k+1, .. as an attention adapter")
    context_window: int = Field(0, ge=0, description="committed positions of trunk hidden a transition carries "
                                                    "(and an attention adapter attends to)")

    @model_validator(mode="after")
    def _window_for_attention(self):
        if self.context_window < self.attention_layers:
            raise ValueError(f"attention_layers {self.attention_layers} needs context_window >= {self.attention_layers} "
                             f"(each layer looks back context_window / attention_layers positions)")
        return self


class ScheduleConfig(Strict):
    """KL -> RL: warm-up (KL only) -> linear ramp -> RL (KL at its floor, CE and PG at their targets)."""
    warmup_steps: int = Field(200, ge=0, description="optimizer steps with KL only")
    ramp_steps: int = Field(800, ge=0, description="steps over which KL decays and CE/PG rise linearly")
    kl_weight: float = Field(1.0, ge=0, description="KL weight during warm-up")
    kl_floor: float = Field(0.1, ge=0, le=1, description="KL weight after the ramp, as a fraction of kl_weight")
    ce_weight: float = Field(1.0, ge=0, description="CE weight after the ramp")
    pg_weight: float = Field(1.0, ge=0, description="PG weight after the ramp")


class LossConfig(Strict):
    distill_temperature: float = Field(1.0, gt=0, description="softens both sides of the KL")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clip range of the importance ratio")
    baseline_decay: float = Field(0.9, ge=0, lt=1, description="EMA decay of the reward baseline")
    baseline_init: float = Field(0.0, ge=0, le=1, description="baseline before the first batch")


class OnlineConfig(Strict):
    """`dvi online` (configs/online.yaml): the in-process loop of selfspec.online."""
    model: str = DEFAULT_MODEL
    workload: str = Field("builtin", description="prompt source: builtin, humaneval, or a Spec-Bench JSONL path")
    extra_train_workload: str | None = Field(
        None, description="more training prompts (e.g. from `dvi synth-prompts`), used after the workload's own")
    train_prompts: int = Field(28, ge=1)
    heldout_prompts: int = Field(7, ge=1, description="taken from the end of the workload, never trained on")
    max_new_tokens: int = Field(128, ge=2)
    gamma: int = Field(4, ge=1)
    exit_layer: int = Field(4, ge=1, description="layer k whose hidden state the head reads")
    head: HeadConfig = HeadConfig()
    schedule: str = "kl_rl"
    schedule_config: ScheduleConfig = ScheduleConfig()
    loss: LossConfig = LossConfig()
    topk: int = Field(16, ge=1, le=32, description="top-K of draft and verifier distributions kept per position")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(64, ge=1, description="transitions per optimizer step")
    epochs: int = Field(2, ge=1, description="passes over each chunk's transitions")
    chunk_prompts: int = Field(8, ge=1, description="prompts decoded with one head version")
    prompt_positions: bool = Field(False, description="also distill (KL only) on the prompts' positions")
    sampled_responses: int = Field(0, ge=0, description="more responses per training prompt, sampled and distilled "
                                   "on (KL only): more text from the same prompts")
    sample_temperature: float = Field(0.8, gt=0)
    sample_top_p: float = Field(0.95, gt=0, le=1)
    collect_batch: int = Field(8, ge=1, description="batch size of greedy generation")
    seed: int = 0
    device: str | None = Field(None, description="cpu, cuda or cuda:N (None: cuda when torch sees a GPU, else cpu)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="model precision (auto: float32, see selfspec.device)")
