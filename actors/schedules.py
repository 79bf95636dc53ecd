"""Which workload each successive request comes from, for drift studies.

- `phases`: code for 40 requests, then translation for 60 s, then math ... (the last phase runs on).
- `mixture`: weights given at a few points along the request index or the clock, linearly
  interpolated in between (held flat outside), sampled per request from a seeded generator.
- `uniform`: every workload equally likely, throughout.

A schedule is asked `next(t_s)` once per request, in arrival order, with that request's arrival time.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

import numpy as np
from pydantic import Field, model_validator

from selfspec.config import FrozenStrict


class Phase(FrozenStrict):
    """One workload for a number of requests or seconds (give exactly one); the last phase runs on."""
    workload: str = Field(description="the workload every request of the phase comes from")
    requests: int | None = Field(None, ge=1, description="length of the phase, in requests")
    seconds: float | None = Field(None, gt=0, allow_inf_nan=False, description="length of the phase, in seconds of "
                                                                               "arrival time")

    @model_validator(mode="after")
    def _one_length(self):
        if (self.requests is None) == (self.seconds is None):
            raise ValueError(f"phase {self.workload}: give exactly one of requests or seconds")
        return self


class PhasesSpec(FrozenStrict):
    """Workloads one after another: a drift study's shifts."""
    kind: Literal["phases"] = Field(description="selects this schedule")
    phases: list[Phase] = Field(min_length=1, description="the phases, in order")

    def workloads(self) -> set[str]:
        return {p.workload for p in self.phases}

    def build(self, workloads: list[str], rng: np.random.Generator) -> "PhaseSchedule":
        return PhaseSchedule(self.phases)


class MixturePoint(FrozenStrict):
    """The workloads' weights at one point of the mixture's axis."""
    at: float = Field(ge=0, allow_inf_nan=False, description="a request index or seconds, by the mixture's axis")
    weights: dict[str, float] = Field(description="workload -> relative weight (>= 0, positive sum)")

    @model_validator(mode="after")
    def _positive(self):
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"mixture weights at {self.at} must be >= 0 with a positive sum")
        return self


class MixtureSpec(FrozenStrict):
    """Workload weights given at a few points, linearly interpolated between them (held flat outside), sampled
    per request."""
    kind: Literal["mixture"] = Field(description="selects this schedule")
    axis: Literal["requests", "seconds"] = Field("requests", description="what the points' `at` counts: request "
                                                                         "index or arrival time in seconds")
    points: list[MixturePoint] = Field(min_length=1, description="the weights along the axis, `at` strictly "
                                                                 "increasing")

    @model_validator(mode="after")
    def _increasing(self):
        at = [p.at for p in self.points]
        if any(b <= a for a, b in zip(at, at[1:])):
            raise ValueError(f"mixture points must have strictly increasing `at`, got {at}")
        return self

    def workloads(self) -> set[str]:
        return {w for p in self.points for w in p.weights}

    def build(self, workloads: list[str], rng: np.random.Generator) -> "MixtureSchedule":
        return MixtureSchedule(self, rng)


class UniformSpec(FrozenStrict):
    """Every workload the sources give equally likely, throughout."""
    kind: Literal["uniform"] = Field(description="selects this schedule")

    def workloads(self) -> set[str]:
        return set()

    def build(self, workloads: list[str], rng: np.random.Generator) -> "MixtureSchedule":
        return MixtureSchedule(MixtureSpec(kind="mixture", points=[MixturePoint(at=0, weights=dict.fromkeys(workloads, 1.0))]), rng)


ScheduleSpec = Annotated[Union[PhasesSpec, MixtureSpec, UniformSpec], Field(discriminator="kind")]


class PhaseSchedule:
    """Phases in order. A phase begins where the previous one ended: a seconds phase at its end time, a
    requests phase at its last request's arrival; the first begins at 0. A seconds phase covers
    [start, start + seconds): a request at exactly the end belongs to the next phase."""

    def __init__(self, phases: list[Phase]):
        self.phases = phases
        self._phase, self._count, self._start, self._last_t = 0, 0, 0.0, 0.0

    def _over(self, t_s: float) -> bool:
        phase = self.phases[self._phase]
        return self._count >= phase.requests if phase.requests is not None else t_s >= self._start + phase.seconds

    def next(self, t_s: float) -> str:
        while self._phase < len(self.phases) - 1 and self._over(t_s):
            phase = self.phases[self._phase]
            self._start = self._last_t if phase.requests is not None else self._start + phase.seconds
            self._phase, self._count = self._phase + 1, 0
        self._count += 1
        self._last_t = t_s
        return self.phases[self._phase].workload


class MixtureSchedule:
    def __init__(self, spec: MixtureSpec, rng: np.random.Generator):
        self.spec, self.rng = spec, rng
        self.names = sorted({w for p in spec.points for w in p.weights})  # sorted: draws don't depend on dict order
        self._at = np.array([p.at for p in spec.points])
        self._w = np.array([[p.weights.get(name, 0.0) for name in self.names] for p in spec.points])
        self._index = 0

    def weights(self, x: float) -> np.ndarray:
        """The normalised mixture at x (np.interp holds the end points flat outside [first, last])."""
        w = np.array([np.interp(x, self._at, self._w[:, j]) for j in range(len(self.names))])
        return w / w.sum()

    def next(self, t_s: float) -> str:
        x = self._index if self.spec.axis == "requests" else t_s
        self._index += 1
        return self.names[self.rng.choice(len(self.names), p=self.weights(x))]
