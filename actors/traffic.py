"""Traffic replay: a workload spec becomes a trace file; a trace is replayed against generation actors.

The parts, one module each:

- `actors.trace`      the JSONL trace format (`TraceRequest`, `read_trace`, `write_trace`, `ConversationMemory`)
- `actors.workloads`  sources of text: Spec-Bench-format files, HumanEval, built-in prompts, prompt lists
- `actors.schedules`  which workload each request comes from: phases, mixture shifts, uniform
- `actors.arrivals`   when requests arrive: recorded, Poisson, bursts, on/off, closed loop of N users
- `actors.dispatch`   least-loaded routing to actors and the per-request record (latency, TTFT, tokens/s, MAL)

This module holds the spec `dvi trace make` reads and `make_trace`, which writes nothing itself.
"""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.arrivals import OPEN_LOOP, ArrivalSpec, ImmediateSpec
from actors.schedules import ScheduleSpec, UniformSpec
from actors.trace import TraceRequest
from actors.workloads import SourceSpec, WorkloadStream, load_workloads


class TraceSpec(BaseModel):
    """A reproducible trace: the same spec (seed included) always writes the same file."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(ge=1, description="requests (each turn of a multi-turn question is one)")
    seed: int = Field(0, description="seed of the arrival times and of a mixture's workload picks")
    max_new_tokens: int = Field(128, ge=1, description="most tokens generated per request")
    temperature: float = Field(0.0, ge=0, allow_inf_nan=False, description="sampling temperature of every request "
                                                                           "(0: greedy)")
    sources: list[SourceSpec] = Field(min_length=1, description="where the prompts come from, each tagged with a "
                                                                "workload")
    schedule: ScheduleSpec = Field(UniformSpec(kind="uniform"), description="which workload each successive "
                                                                            "request comes from")
    arrival: ArrivalSpec = Field(ImmediateSpec(kind="immediate"), description="when requests arrive (written into "
                                                                              "the trace as arrival_s)")

    @model_validator(mode="after")
    def _open_loop_only(self):
        if not isinstance(self.arrival, OPEN_LOOP):
            raise ValueError(f"arrival kind {self.arrival.kind} is chosen when a trace is replayed, not written "
                             "into it; write the trace with immediate, poisson, burst or on_off arrivals")
        return self


def make_trace(spec: TraceSpec) -> list[TraceRequest]:
    workloads = load_workloads(spec.sources)
    unknown = spec.schedule.workloads() - set(workloads)
    if unknown:
        raise ValueError(f"the schedule names workloads {sorted(unknown)} that no source provides "
                         f"(the sources give {sorted(workloads)})")
    # Separate generators for times and workload picks: changing the arrival process leaves the
    # workload sequence of a mixture as it was, and vice versa.
    time_rng, pick_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(2))
    times = spec.arrival.times(spec.n, time_rng)
    schedule = spec.schedule.build(list(workloads), pick_rng)
    streams = {name: WorkloadStream(conversations) for name, conversations in workloads.items()}
    trace = []
    for i, t in enumerate(times):
        workload = schedule.next(float(t))
        text = streams[workload].next()
        trace.append(TraceRequest(arrival_s=round(float(t), 6), request_id=f"r{i:05d}", workload=workload,
                                  messages=text.messages, max_new_tokens=spec.max_new_tokens,
                                  temperature=spec.temperature, conversation_id=text.conversation_id,
                                  source=text.source))
    return trace


def trace_summary(requests: list[TraceRequest]) -> list[dict]:
    """Per workload, in first-appearance order: requests, later turns among them, exact repeats (the same
    prompt as an earlier request: a traffic memory serves it as a cache hit, not by learning), first and
    last arrival."""
    rows: dict[str, dict] = {}
    seen: set[str] = set()
    for r in requests:
        row = rows.setdefault(r.workload, {"workload": r.workload, "requests": 0, "later_turns": 0, "repeats": 0,
                                           "first_s": r.arrival_s, "last_s": r.arrival_s})
        row["requests"] += 1
        row["later_turns"] += r.turn > 0
        text = r.prompt if r.prompt is not None else repr([(m.role, m.content) for m in r.messages])
        row["repeats"] += text in seen
        seen.add(text)
        row["first_s"], row["last_s"] = min(row["first_s"], r.arrival_s), max(row["last_s"], r.arrival_s)
    return list(rows.values())
