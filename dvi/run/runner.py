"""`dvi run`: the whole system on one trace. Redis, the learner ranks and the generation actors start,
the trace replays through the least-loaded dispatcher while a monitor thread records the actors and
keeps the learner and Redis alive, then the learner trains what is buffered and stops, and the run
directory gets its summary and report.

    run_dir/config.yaml     the resolved config (rerun with `dvi run --config run_dir/config.yaml`)
    run_dir/trace.jsonl     the replayed trace
    run_dir/requests.jsonl  one record per request, failed ones included
    run_dir/metrics.jsonl   the monitor's snapshots and events; tb/ the same as TensorBoard scalars
    run_dir/learner/        the learner's metrics.jsonl, versions.jsonl, heads/vNNNN, checkpoints/
    run_dir/summary.json    and report.md with plots/
"""
from __future__ import annotations

import json
import shutil
from functools import partial
from dataclasses import dataclass
from pathlib import Path

import yaml

from actors.arrivals import RecordedSpec
from actors.dispatch import Dispatcher, RequestRecord, line_error_records, replay_trace
from actors.trace import TraceRequest, read_trace, write_trace
from dvi.report.format import fixed
from dvi.run.config import RUN_OWNED, RunConfig, SystemConfig
from dvi.run.plane import LearningPlane, write_summary


@dataclass
class Trace:
    requests: list[TraceRequest]
    rejected: list[RequestRecord]  # bad lines and unknown workloads: reported, never sent


def prepare_run_dir(cfg: SystemConfig, overwrite: bool) -> Path:
    run_dir = Path(cfg.out_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"run directory {run_dir} is not empty: choose another --out-dir, or pass "
                                  "--overwrite to replace it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # what the run owns is set once at the top level: the saved file loads back as a RunConfig
    owned = {section: set(keys) for section, keys in RUN_OWNED.items()}
    resolved = cfg.model_dump(mode="json", exclude={**cfg.secrets(), **owned})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    return run_dir


def load_trace(cfg: RunConfig, run_dir: Path) -> Trace:
    """The trace (made from the spec, or read), saved into the run directory as the run replays it."""
    from actors.traffic import make_trace
    from actors.workloads import load_workloads

    if cfg.trace.make is not None:
        requests, errors = make_trace(cfg.trace.make), []
        known = cfg.trace.workloads or sorted(load_workloads(cfg.trace.make.sources))
    else:
        requests, errors = read_trace(cfg.trace.path)
        known = cfg.trace.workloads
    write_trace(requests, run_dir / "trace.jsonl")
    rejected = line_error_records(errors)
    if known is not None:
        for r in [r for r in requests if r.workload not in known]:
            rejected.append(RequestRecord(r.request_id, r.workload, error=f"unknown workload {r.workload!r}: this "
                                                                          f"run serves {', '.join(known)}"))
        requests = [r for r in requests if r.workload in known]
    return Trace(requests, rejected)


def run(cfg: RunConfig, *, overwrite: bool = False, progress: bool = True) -> tuple[Path, dict]:
    """Run the config end to end; returns the run directory and its summary."""
    import ray

    from actors.generation import start_actor
    from dvi.run.monitor import actor_metrics

    run_dir = prepare_run_dir(cfg, overwrite)
    trace = load_trace(cfg, run_dir)
    with LearningPlane(cfg, run_dir) as plane:
        actors = [start_actor(cfg.actor_config(), plane.run_id, i, **plane.redis_kwargs())
                  for i in range(cfg.actors.count)]
        try:
            monitor = plane.start(actor_metrics(actors, timeout_s=max(cfg.metrics_every_s, 5)))
            ray.get([a.metrics.remote() for a in actors])  # every actor loaded
            plane.generators_ready(f"{len(actors)} actors loaded")
            records = replay_recorded(trace, cfg.trace.arrival or RecordedSpec(kind="recorded"), Dispatcher(actors),
                                      run_dir / "requests.jsonl", cfg.seed, partial(_live, monitor) if progress else None)
            counts = plane.finish()
        finally:
            for actor in actors:
                ray.kill(actor)
        return run_dir, write_summary(cfg, run_dir, records, counts, plane, trace_rejected=len(trace.rejected))


def _live(monitor) -> dict:
    """What the progress bar shows of the monitor's last snapshot."""
    snap = monitor.latest
    return {"tok/s": fixed(snap.get("charts/served_tokens_per_s")), "MAL": fixed(snap.get("charts/mean_accepted_length")),
            "head": snap.get("charts/head_version")}


def replay_recorded(trace: Trace, arrival, dispatcher, out: Path, seed: int, progress) -> list[dict]:
    """Replay `trace` through `dispatcher` under `arrival`, writing one record per request to `out` as it
    finishes (the rejected lines first); returns them all as dicts. `progress`: None for no bar, else a
    callable giving what the bar shows beside the failures."""
    from tqdm import tqdm

    bar = tqdm(total=len(trace.requests) + len(trace.rejected), desc="requests", unit="req",
               disable=progress is None, dynamic_ncols=True)
    failed = [len(trace.rejected)]
    bar.update(len(trace.rejected))
    with out.open("w") as f:
        for record in trace.rejected:
            f.write(json.dumps(record.to_dict()) + "\n")

        def on_record(record: RequestRecord) -> None:
            f.write(json.dumps(record.to_dict()) + "\n")
            f.flush()
            failed[0] += not record.ok
            bar.set_postfix({"failed": failed[0], **(progress() if progress else {})}, refresh=False)
            bar.update(1)

        try:
            served = replay_trace(trace.requests, arrival, dispatcher, seed=seed, on_record=on_record)
        finally:
            bar.close()
            dispatcher.close()
    return [r.to_dict() for r in trace.rejected + served]
