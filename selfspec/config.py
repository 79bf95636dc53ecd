"""The drafter's typed settings, free of torch: a command validates a config (and reports a bad value in one
line) before anything heavy is imported.

`Strict` is the base of every config section: an unknown key is an error naming the key. `ModelSideConfig`
owns the keys every model-side part has (model, exit layer, head, draft length); `DecodingConfig` adds what
a part that decodes has (dtype, top-K). `dvi online` (`OnlineConfig`), a generation actor
(actors.config.GenerationConfig) and the learner (learner.config.LearnerConfig) inherit them, so the keys
mean the same and are checked the same everywhere while every YAML file stays flat. The classes that use
these settings live elsewhere: `DrafterHead` (selfspec.drafter) builds a head from a `HeadConfig`, the
objectives (selfspec.objectives) read `ScheduleConfig` and `LossConfig`, the in-process loop
(selfspec.online) runs an `OnlineConfig`.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from selfspec.defaults import DEFAULT_MODEL

ScheduleName = Literal["kl_rl", "kl_only", "ce_only", "pg_only"]  # selfspec.objectives.make_schedule
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class Strict(BaseModel):
    """A config section: unknown keys are errors (the message names the key)."""
    model_config = ConfigDict(extra="forbid")


class FrozenStrict(Strict):
    """A strict section that is a value once built (specs shared between threads and actors)."""
    model_config = ConfigDict(extra="forbid", frozen=True)


class HeadConfig(Strict):
    """The drafter head's shape: layer k's hidden state -> [attention adapter] -> MLP adapter -> the model's
    output projection (frozen) with LoRA on it, over the full or a reduced draft vocabulary (selfspec.drafter)."""
    adapter_hidden: int = Field(1024, ge=0, description="width of the residual MLP adapter (0: none)")
    lora_rank: int = Field(16, ge=0, description="LoRA rank on the output projection (0: none)")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scale: the low-rank update is multiplied by "
                                                     "lora_alpha / lora_rank")
    draft_vocab: int | None = Field(None, ge=16, description="draft only over this many output ids, chosen when the "
                                                        "head is built (dvi online: those its training paths use "
                                                        "most; the learner: see draft_vocab_from); null: all ids")
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
    """The KL, CE and PG losses' own settings (their weights over time are the schedule's)."""
    distill_temperature: float = Field(1.0, gt=0, description="softens both sides of the KL")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clip range of the importance ratio")
    baseline_decay: float = Field(0.9, ge=0, lt=1, description="EMA decay of the reward baseline")
    baseline_init: float = Field(0.0, ge=0, le=1, description="baseline before the first batch")


class ModelSideConfig(Strict):
    """The keys every model-side part has: `dvi online`, a generation actor and the learner each load the model,
    put a drafter head on layer `exit_layer` and draft `gamma` tokens a round (the learner: to score held-out
    prompts). Their configs inherit these keys, so the YAML stays flat. `dvi run` sets model, exit_layer and head
    once, at its top level, for its actors and learner."""
    model: str = Field(DEFAULT_MODEL, description="model name (e.g. smollm2-135m) or a Hugging Face model directory")
    exit_layer: int = Field(4, ge=1, description="layer k whose hidden state the head reads")
    head: HeadConfig = Field(HeadConfig(), description="the shape of a new drafter head")
    gamma: int = Field(4, ge=1, description="draft length γ: tokens drafted per round when rounds are simulated "
                                            "along greedy paths; the mean accepted length (MAL) is measured at it")


class DecodingConfig(ModelSideConfig):
    """A model-side part that decodes and records transitions (`dvi online`, a generation actor); the learner
    has neither key: it picks its own precision and reads K from the transitions."""
    dtype: Dtype = Field("auto", description="model precision (auto: float32, see selfspec.device)")
    topk: int = Field(16, ge=1, description="K of the top-K draft and verifier distributions a transition "
                                            "carries per position")


class TrainingConfig(Strict):
    """The keys of every part that trains the head (`dvi online`, the learner): the loss schedule and AdamW."""
    schedule: ScheduleName = Field("kl_rl", description="loss schedule by optimizer step: kl_rl (KL, then ramp to "
                                                        "CE and PG), kl_only, ce_only or pg_only")
    schedule_config: ScheduleConfig = Field(ScheduleConfig(), description="the schedule's steps and weights")
    loss: LossConfig = Field(LossConfig(), description="the losses' own settings")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")


class OnlineConfig(TrainingConfig, DecodingConfig):
    """`dvi online` (configs/online.yaml): the in-process loop of selfspec.online."""
    workload: str = Field("builtin", description="prompt source: builtin, humaneval, or a Spec-Bench JSONL path")
    extra_train_workload: str | None = Field(
        None, description="more training prompts (e.g. from `dvi synth-prompts`), used after the workload's own")
    train_prompts: int = Field(28, ge=1, description="training prompts, from the start of the workload (then "
                                                     "extra_train_workload's)")
    heldout_prompts: int = Field(7, ge=1, description="taken from the end of the workload, never trained on")
    max_new_tokens: int = Field(128, ge=2, description="length of each prompt's greedy path (the model's own "
                                                       "answer), in tokens")
    # Overrides DecodingConfig.topk: the transitions come from cached greedy paths, which keep the verifier's
    # top 32 per position (selfspec.path_cache.TOPK_STORED); an actor computes its top-K live.
    topk: int = Field(16, ge=1, le=32, description="K of the top-K draft and verifier distributions a transition "
                                                   "carries per position (at most the 32 a cached path keeps)")
    batch_size: int = Field(64, ge=1, description="transitions per optimizer step")
    epochs: int = Field(2, ge=1, description="passes over each chunk's transitions")
    chunk_prompts: int = Field(8, ge=1, description="prompts decoded with one head version")
    prompt_positions: bool = Field(False, description="also distill (KL only) on the prompts' positions")
    sampled_responses: int = Field(0, ge=0, description="more responses per training prompt, sampled and distilled "
                                   "on (KL only): more text from the same prompts")
    sample_temperature: float = Field(0.8, gt=0, description="sampling temperature of the sampled responses")
    sample_top_p: float = Field(0.95, gt=0, le=1, description="nucleus (top-p) mass of the sampled responses")
    collect_batch: int = Field(8, ge=1, description="batch size of greedy generation")
    seed: int = Field(0, description="seed of the head's initialisation and of the batch order")
    device: str | None = Field(None, description="cpu, cuda or cuda:N (None: cuda when torch sees a GPU, else cpu)")
