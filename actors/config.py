"""Typed settings of a generation actor (`actors/generation.py`).

Unknown keys are errors naming the key, like every other config section of the project. The actor's
Redis connection and run id are not here: the run owns them (one server and one run for every actor).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from buffer.config import StreamConfig
from selfspec.config import HeadConfig, Strict
from selfspec.defaults import DEFAULT_MODEL


class GenerationConfig(Strict):
    model: str = Field(DEFAULT_MODEL, description="model name or HF model directory")
    exit_layer: int = Field(4, ge=1, description="layer k whose hidden state the head reads")
    head_path: str | None = Field(None, description="a saved head (dvi online/train output) to start from; its own "
                                                  "exit layer wins. None: an untrained head of config `head`")
    head: HeadConfig = HeadConfig()
    gamma: int = Field(4, ge=0, description="most drafts per round (0: plain decoding)")
    length_policy: Literal["fixed", "threshold", "cost_aware"] = "cost_aware"
    ngram: int = Field(1, ge=0, description="shortest suffix match to copy drafts from the request's own text (0: off)")
    topk: int = Field(16, ge=1, description="K of the top-K draft and target distributions a transition carries")
    prompt_rows: int = Field(64, ge=0, description="also send the prompt's last N positions as KL rows (the "
                                                   "prefill verified them); 0: generated positions only")
    weights_check_every_rounds: int = Field(
        64, ge=1, description="read weights:latest once this many rounds went by (checked, and swapped, "
                              "between requests)")
    num_threads: int | None = Field(None, ge=1, description="torch threads (CPU); None: num_cpus when set, "
                                                           "else torch's default")
    num_cpus: float = Field(1, gt=0, description="Ray CPUs per actor")
    num_gpus: float = Field(0, ge=0, description="Ray GPUs per actor (1 on a GPU cluster: one actor per GPU)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="model precision (auto: float32, see selfspec.device)")
    passes: Literal["auto", "eager", "static", "graphs"] = Field(
        "auto", description="how decode passes run (selfspec.passes; auto: CUDA graphs on a GPU, else eager)")
    max_restarts: int = Field(3, ge=-1, description="Ray restarts a crashed actor this often (-1: always)")
    max_concurrency: int = Field(64, ge=1, description="requests an actor accepts at once; it decodes one at a "
                                                       "time in arrival order, the rest are its queue depth")
    stream: StreamConfig = StreamConfig()
