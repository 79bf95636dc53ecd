"""Typed settings of a generation actor (`actors/generation.py`).

Unknown keys are errors naming the key, like every other config section of the project. The keys every
model-side part has (model, exit_layer, head, gamma, dtype, topk) come from selfspec.config.DecodingConfig.
The actor's Redis connection and run id are not here: the run owns them (one server and one run for every
actor).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from buffer.config import StreamConfig
from selfspec.config import DecodingConfig, Strict
from selfspec.suffix_index import SuffixIndexConfig

INDEX = SuffixIndexConfig()  # the memory's own defaults


class MemoryConfig(Strict):
    """The traffic memory's bounds (selfspec.suffix_index) and what goes into it."""
    max_sequences: int = Field(INDEX.max_sequences, ge=1, description="responses (and prompts) an actor's memory "
                                                                      "holds; the oldest go first")
    max_tokens: int = Field(INDEX.max_tokens, ge=1, description="tokens it holds; the oldest sequences go first")
    min_match: int = Field(INDEX.min_match, ge=1, le=INDEX.max_match, description="shortest suffix match with stored "
                                                                                  "text that drafts")
    prompts: bool = Field(False, description="also store each request's prompt, not only its response")
    stream_maxlen: int = Field(10_000, ge=1, description="shared: entries the run's `served` stream keeps "
                                                         "(approximately), which a new actor reads to catch up")


class GenerationConfig(DecodingConfig):
    """A generation actor: serves requests with self-speculative decoding and streams what the verifier decided."""
    head_path: str | None = Field(None, description="a saved head directory to start from (`dvi online`'s, or a "
                                                  "run's learner/heads/vNNNN); its own exit layer and shape win. "
                                                  "null: an untrained head of config `head`")
    # Overrides ModelSideConfig.gamma (>= 1 where rounds are simulated at a fixed length): an actor serves,
    # and 0 is plain decoding, the baseline a run compares with.
    gamma: int = Field(4, ge=0, description="most drafts per round (0: plain decoding); length_policy picks each "
                                            "round's length up to it")
    length_policy: Literal["fixed", "threshold", "cost_aware"] = Field(
        "cost_aware", description="drafts per round: fixed (always gamma), threshold (stop once the head is "
                                  "unsure) or cost_aware (as many as its calibrated confidence pays for, down to 0)")
    ngram: int = Field(1, ge=0, description="shortest suffix match to copy drafts from the request's own text (0: off)")
    memory: Literal["off", "local", "shared"] = Field(
        "off", description="traffic memory: also copy drafts from responses served before (selfspec.suffix_index): "
                           "off, local (this actor's own) or shared (every actor's, through the run's `served` stream)")
    memory_bounds: MemoryConfig = Field(MemoryConfig(), description="the traffic memory's bounds")
    prompt_rows: int = Field(64, ge=0, description="also send the prompt's last N positions as KL rows (the "
                                                   "prefill verified them); 0: generated positions only")
    weights_check_every_rounds: int = Field(
        64, ge=1, description="read weights:latest once this many rounds went by (checked, and swapped, "
                              "between rounds, when waiting requests join)")
    num_threads: int | None = Field(None, ge=1, description="torch threads (CPU); None: num_cpus when set, "
                                                           "else torch's default")
    num_cpus: float = Field(1, gt=0, description="Ray CPUs per actor")
    num_gpus: float = Field(0, ge=0, description="Ray GPUs per actor (1 on a GPU cluster: one actor per GPU)")
    passes: Literal["auto", "eager", "static", "graphs"] = Field(
        "auto", description="how decode passes run (selfspec.passes; auto: CUDA graphs on a GPU, else eager)")
    max_restarts: int = Field(3, ge=-1, description="Ray restarts a crashed actor this often (-1: always)")
    max_batch: int = Field(8, ge=1, description="requests an actor decodes together, round by round (continuous "
                                                "batching; 1: one at a time); the length policy decides what to "
                                                "draft at each batch size")
    max_concurrency: int = Field(64, ge=1, description="requests an actor accepts at once: max_batch decode, the rest "
                                                       "wait in arrival order (its queue depth)")
    stream: StreamConfig = Field(StreamConfig(), description="how the actor writes transitions to the stream")
