"""When requests arrive: recorded timestamps, Poisson, bursts, on/off, and a closed loop of N users.

A closed loop cannot be written down as timestamps (a user's next request depends on when its last
one completed), so every process is an `Arrivals` object the replayer asks: `next_at()` ("when may the
next request go?"), then tells `sent(now)` and `done(now)`. Open-loop processes are precomputed times
behind the same interface (`OpenLoop`); `dvi trace make` writes those times into the trace.
"""
from __future__ import annotations

import heapq
from typing import Annotated, Literal, Protocol, Union

import numpy as np
from pydantic import Field

from selfspec.config import FrozenStrict


class Arrivals(Protocol):
    def next_at(self) -> float | None:
        """Seconds from the start at which the next request may be sent; None: not before a request in
        flight completes (closed loop), or never (open loop, all sent)."""

    def sent(self, now_s: float) -> None: ...

    def done(self, now_s: float) -> None: ...


class OpenLoop:
    """Precomputed arrival times: requests go at their time whatever the servers are doing."""

    def __init__(self, times_s):
        self.times_s = np.asarray(times_s, dtype=float)
        if self.times_s.ndim != 1 or np.any(np.diff(self.times_s) < 0) or np.any(self.times_s < 0):
            raise ValueError("arrival times must be a non-decreasing list of seconds >= 0")
        self._next = 0

    def next_at(self) -> float | None:
        return float(self.times_s[self._next]) if self._next < len(self.times_s) else None

    def sent(self, now_s: float) -> None:
        self._next += 1

    def done(self, now_s: float) -> None:
        pass


class ClosedLoop:
    """N users, each with at most one request in flight; a user sends again `think_s` after its answer.

    Users are interchangeable, so the state is just when each idle user is ready (a heap); all start at 0.
    `think="exponential"` draws each think time with mean think_s from `rng` (seeded by the caller).
    """

    def __init__(self, users: int, think_s: float = 0.0, think: str = "fixed", rng: np.random.Generator | None = None):
        if users < 1:
            raise ValueError(f"a closed loop needs at least 1 user, got {users}")
        if think not in ("fixed", "exponential"):
            raise ValueError(f"think must be fixed or exponential, got {think}")
        self.users, self.think_s, self.think = users, think_s, think
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self._ready = [0.0] * users  # a heap of idle users' ready times
        self.in_flight = 0

    def next_at(self) -> float | None:
        return self._ready[0] if self._ready else None

    def sent(self, now_s: float) -> None:
        heapq.heappop(self._ready)
        self.in_flight += 1

    def done(self, now_s: float) -> None:
        pause = self.rng.exponential(self.think_s) if self.think == "exponential" and self.think_s > 0 else self.think_s
        heapq.heappush(self._ready, now_s + float(pause))
        self.in_flight -= 1


def poisson_times(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """A Poisson process at `rate` requests/s: exponential gaps with mean 1/rate."""
    return np.cumsum(rng.exponential(1.0 / rate, n))


def burst_times(n: int, size: int, every_s: float) -> np.ndarray:
    """`size` requests at once every `every_s` seconds, the first burst at 0."""
    return (np.arange(n) // size) * float(every_s)


def on_off_times(n: int, rate: float, on_s: float, off_s: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson at `rate` during on-periods of on_s, silence for off_s between them: draw the process on the
    on-time clock, then insert an off gap after every full on-period."""
    on_clock = poisson_times(n, rate, rng)
    return on_clock + np.floor(on_clock / on_s) * off_s


class ImmediateSpec(FrozenStrict):
    """Everything at 0: the replay's concurrency decides (a closed loop, or a flood)."""
    kind: Literal["immediate"] = Field(description="selects this arrival process")

    def times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.zeros(n)


class PoissonSpec(FrozenStrict):
    """A Poisson process: exponential gaps between requests."""
    kind: Literal["poisson"] = Field(description="selects this arrival process")
    rate: float = Field(gt=0, allow_inf_nan=False, description="mean arrivals, in requests per second")

    def times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return poisson_times(n, self.rate, rng)


class BurstSpec(FrozenStrict):
    """Bursts: `size` requests at once every `every_s` seconds, the first at 0."""
    kind: Literal["burst"] = Field(description="selects this arrival process")
    size: int = Field(ge=1, description="requests per burst")
    every_s: float = Field(gt=0, allow_inf_nan=False, description="seconds between bursts")

    def times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return burst_times(n, self.size, self.every_s)


class OnOffSpec(FrozenStrict):
    """Poisson arrivals during on-periods, silence between them."""
    kind: Literal["on_off"] = Field(description="selects this arrival process")
    rate: float = Field(gt=0, allow_inf_nan=False, description="mean arrivals while on, in requests per second")
    on_s: float = Field(gt=0, allow_inf_nan=False, description="length of each on-period, in seconds")
    off_s: float = Field(ge=0, allow_inf_nan=False, description="silence between on-periods, in seconds")

    def times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return on_off_times(n, self.rate, self.on_s, self.off_s, rng)


class RecordedSpec(FrozenStrict):
    """The trace's own arrival_s, multiplied by time_scale (0.5 replays twice as fast)."""
    kind: Literal["recorded"] = Field(description="selects this arrival process")
    time_scale: float = Field(1.0, gt=0, allow_inf_nan=False, description="factor on the recorded times (0.5: twice "
                                                                          "as fast)")


class ClosedLoopSpec(FrozenStrict):
    """N users, each with at most one request in flight, sending the next one `think_s` after its answer."""
    kind: Literal["closed_loop"] = Field(description="selects this arrival process")
    users: int = Field(ge=1, description="concurrent users (requests in flight at most)")
    think_s: float = Field(0.0, ge=0, allow_inf_nan=False, description="a user's pause between an answer and its "
                                                                       "next request, in seconds (the mean when "
                                                                       "exponential)")
    think: Literal["fixed", "exponential"] = Field("fixed", description="think_s exactly, or exponentially "
                                                                        "distributed with that mean")


OPEN_LOOP = (ImmediateSpec, PoissonSpec, BurstSpec, OnOffSpec)
ArrivalSpec = Annotated[Union[ImmediateSpec, PoissonSpec, BurstSpec, OnOffSpec, RecordedSpec, ClosedLoopSpec],
                        Field(discriminator="kind")]


def make_arrivals(spec, recorded_s, rng: np.random.Generator) -> Arrivals:
    """The replay-time process for `len(recorded_s)` requests, in dispatch order: `recorded` rescales the
    trace's times, an open-loop spec draws fresh ones (like benchmark_serving's --request-rate), a closed
    loop ignores them."""
    if isinstance(spec, RecordedSpec):
        return OpenLoop(np.asarray(recorded_s, dtype=float) * spec.time_scale)
    if isinstance(spec, ClosedLoopSpec):
        return ClosedLoop(spec.users, spec.think_s, spec.think, rng)
    return OpenLoop(spec.times(len(recorded_s), rng))
