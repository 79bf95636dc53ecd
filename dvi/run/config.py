"""Typed settings of `dvi run` (configs/local.yaml, configs/gpu.yaml), and what `dvi serve` shares with it.

The run owns what its parts must agree on: the model, the exit layer, the head, the run id, the Redis
server and the output directory. They are set once at the top level and handed to the actors and the
learner, so `actors:` and `learner:` may not set them (one clear error naming the key).
"""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from actors.arrivals import ArrivalSpec
from actors.config import GenerationConfig
from actors.traffic import TraceSpec
from buffer.config import RedisConfig, StreamConfig
from dvi.run.files import learner_dir
from learner.config import LearnerConfig
from selfspec.config import HeadConfig, ModelSideConfig, Strict

RUN_OWNED = {"actors": ("model", "exit_layer", "head", "stream"),
             "learner": ("run_id", "model", "exit_layer", "head", "out_dir", "redis", "stream")}


class ActorsConfig(GenerationConfig):
    """The generation actors: each one's settings, and how many."""
    count: int = Field(2, ge=1, description="generation actors (one per GPU on a cluster)")


class TraceConfig(Strict):
    """The traffic the run replays: a trace file, or a spec the trace is made from; and how requests arrive."""
    path: str | None = Field(None, description="a trace file (`dvi trace make`); when set, `make` is not used")
    make: TraceSpec | None = Field(None, description="a workload spec: the trace is made at start and saved")
    arrival: ArrivalSpec | None = Field(None, description="replay-time arrivals (e.g. closed_loop users); "
                                                          "None: the trace's own timestamps")
    workloads: list[str] | None = Field(None, description="workloads this run serves; a request tagged with "
                                                          "another fails. None: any (or the spec's sources)")

    @model_validator(mode="after")
    def _one_source(self):
        if self.path is None and self.make is None:
            raise ValueError("give trace.path (a trace file) or trace.make (a workload spec)")
        if self.path is not None:
            self.make = None
        return self


# The run sets model, exit_layer and head for its actors and learner: the same fields as theirs (meaning,
# bounds, default), from their one owner.
_PARTS = ModelSideConfig.model_fields


class SystemConfig(Strict):
    """What `dvi run` and `dvi serve` share: the model, the actors, the learner, Redis and the stream."""
    run_id: str | None = Field(None, description="Redis keys live under dvi:{run_id}:; None: the run "
                                                 "directory's name")
    out_dir: str = Field("runs/local", description="the run directory")
    model: str = _PARTS["model"]
    exit_layer: int = _PARTS["exit_layer"]
    head: HeadConfig = _PARTS["head"]
    learn: bool = Field(True, description="false: serve only (no streaming, no learner, no weight pulls)")
    actors: ActorsConfig = Field(ActorsConfig(), description="the generation actors")
    learner: LearnerConfig = Field(LearnerConfig(), description="the learner")
    redis: RedisConfig = Field(RedisConfig(), description="url: an external server; else one is started")
    stream: StreamConfig = Field(StreamConfig(), description="the transition stream, as actors write and the "
                                                             "learner reads it")
    window: float = Field(0.25, gt=0, le=0.5, description="the summary's first/last window: this fraction of "
                                                          "the requests")
    metrics_every_s: float = Field(5.0, gt=0, description="seconds between lines of metrics.jsonl (and checks on "
                                                          "the learner and Redis)")
    drain_timeout_s: float = Field(120.0, ge=0, description="at the end, the learner trains what is buffered for "
                                                            "at most this long")
    learner_restarts: int = Field(3, ge=0, description="a crashed learner resumes from its checkpoint this often")

    @model_validator(mode="before")
    @classmethod
    def _run_owns(cls, data):
        if isinstance(data, dict):
            for section, keys in RUN_OWNED.items():
                given = data.get(section)
                for key in keys:
                    if isinstance(given, dict) and key in given:
                        raise ValueError(f"{section}.{key}: set `{key}` at the top level: the run gives the same "
                                         "to the actors and the learner")
        return data

    def secrets(self) -> dict:
        """What the run directory's config.yaml leaves out (pydantic's `exclude` form)."""
        return {"redis": {"password"}}

    @property
    def run_name(self) -> str:
        return self.run_id or Path(self.out_dir).name

    def actor_config(self) -> GenerationConfig:
        fields = self.actors.model_dump(exclude={"count"})
        return GenerationConfig(**{**fields, "model": self.model, "exit_layer": self.exit_layer,
                                   "head": self.head, "stream": self.stream})

    def learner_config(self, redis_url: str) -> LearnerConfig:
        data = self.learner.model_dump()
        data.update(run_id=self.run_name, model=self.model, exit_layer=self.exit_layer,
                    head=self.head.model_dump(), out_dir=str(learner_dir(self.out_dir)),
                    redis={**self.redis.model_dump(), "url": redis_url, "password": self._password()},
                    stream=self.stream.model_dump())
        return LearnerConfig.model_validate(data)

    def _password(self):
        return self.redis.password.get_secret_value() if self.redis.password else None


class RunConfig(SystemConfig):
    """`dvi run`: the whole system on one trace."""
    trace: TraceConfig = Field(description="the traffic to replay")
    seed: int = Field(0, description="seed of the replay-time arrivals (closed-loop think times, open-loop draws)")

