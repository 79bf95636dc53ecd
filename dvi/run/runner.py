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
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from actors.dispatch import Dispatcher, RequestRecord, line_error_records, replay_trace
from actors.trace import TraceRequest, read_trace, write_trace
from dvi.report.format import fixed, read_jsonl
from dvi.run.config import RUN_OWNED, RunConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")
FINISH_TIMEOUT_S = 1800


@dataclass
class Trace:
    requests: list[TraceRequest]
    rejected: list[RequestRecord]  # bad lines and unknown workloads: reported, never sent


def prepare_run_dir(cfg: RunConfig, overwrite: bool) -> Path:
    run_dir = Path(cfg.out_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"run directory {run_dir} is not empty: choose another --out-dir, or pass "
                                  "--overwrite to replace it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # what the run owns is set once at the top level: the saved file loads back as a RunConfig
    owned = {section: set(keys) for section, keys in RUN_OWNED.items()}
    resolved = cfg.model_dump(mode="json", exclude={"redis": {"password"}, **owned})
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


def actor_redis_url(url: str) -> str:
    """On a multi-node cluster a loopback address means the driver's node: actors elsewhere need its IP."""
    import ray
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname
    if host not in LOOPBACK or len([n for n in ray.nodes() if n["Alive"]]) < 2:
        return url
    return url.replace(host, ray.util.get_node_ip_address(), 1)


def run(cfg: RunConfig, *, overwrite: bool = False, progress: bool = True) -> tuple[Path, dict]:
    """Run the config end to end; returns the run directory and its summary."""
    from buffer.server import RedisServer

    run_dir = prepare_run_dir(cfg, overwrite)
    trace = load_trace(cfg, run_dir)
    server = None
    if cfg.learn:
        # first: an unreachable server is one line in a second, before Ray or a model loads
        server = RedisServer(cfg.redis, run_dir / "redis").start()
    try:
        with RaySession(_cpus_needed(cfg)):
            return run_dir, _serve_and_learn(cfg, run_dir, trace, server, progress)
    finally:
        if server is not None:
            server.stop()


def _cpus_needed(cfg: RunConfig) -> float:
    learner = cfg.learner.placement
    return cfg.actors.count * cfg.actors.num_cpus + (learner.ranks * learner.num_cpus if cfg.learn else 0)


class RaySession:
    """Join the cluster when there is one (a Ray job, RAY_ADDRESS), else start a local Ray for this run
    with at least the CPUs its actors ask for: on a 2-core laptop they share the cores rather than wait
    forever for a CPU Ray would never free."""

    def __init__(self, cpus_needed: float):
        self.cpus_needed = cpus_needed

    def __enter__(self):
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self.owned = not ray.is_initialized()
        if self.owned:
            address = os.environ.get("RAY_ADDRESS")
            cpus = None if address else max(os.cpu_count() or 1, math.ceil(self.cpus_needed))
            ray.init(address=address, num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        return self

    def __exit__(self, *exc):
        import ray

        if self.owned:
            ray.shutdown()


def _serve_and_learn(cfg: RunConfig, run_dir: Path, trace: Trace, server, progress: bool) -> dict:
    import ray

    from actors.generation import start_actor
    from buffer.stream import run_stats
    from dvi.run.monitor import Monitor
    from dvi.run.summary import stream_buffered, summarize
    from learner.launch import SupervisedLearner
    from learner.metrics_log import MetricsLog

    run_id, client, learner = cfg.run_name, None, None
    started = time.time()
    log = MetricsLog(run_dir)
    actors = []
    try:
        redis_kwargs = {}
        if server is not None:
            client = server.client()
            redis_kwargs = {"redis_url": actor_redis_url(server.url), "redis_password": server.password}
        actors = [start_actor(cfg.actor_config(), run_id, i, **redis_kwargs) for i in range(cfg.actors.count)]
        monitor = Monitor(actors, log, cfg.metrics_every_s, server=server, run_id=run_id)
        if server is not None:  # queued, not awaited: the learner prepares while the actors serve
            learner = monitor.learner = SupervisedLearner(
                cfg.learner_config(server.url), cfg.learner_restarts,
                on_restart=lambda info: monitor.event("learner_restart", **info))
        monitor.start()
        ray.get([a.metrics.remote() for a in actors])  # every actor loaded
        ready = time.time()
        monitor.actors_ready()
        records = _replay(cfg, trace, actors, monitor, run_dir, progress)
        if learner is not None:
            _drain(client, run_id, cfg)
        monitor.learner = None  # finishing: no more restarts; the learner's status lines go on
        # finishing includes scoring every version on the held-out paths, which may still be generating
        summaries = learner.finish(timeout_s=FINISH_TIMEOUT_S) if learner is not None else []
        monitor.stop()
        learner = None
        counts = {}
        if client is not None:
            counts = {"stats": run_stats(client, run_id),
                      "trained": sum(s["counters"]["trained_transitions"] for s in summaries),
                      "versions": _versions(run_dir), "buffered": stream_buffered(client, run_id)}
        summary = summarize(records, cfg.window, **counts)
        summary.update(run_id=run_id, actors=cfg.actors.count, started_at=started, wall_s=time.time() - started,
                       actors_ready_s=ready - started, first_request_s=_first_answer(records),
                       events=dict(monitor.events), learner_error=monitor.learner_error,
                       trace_rejected=len(trace.rejected), last_head=_last_head(run_dir))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        log.close()
        if learner is not None:
            learner.group.shutdown()
        for actor in actors:
            ray.kill(actor)


def _replay(cfg: RunConfig, trace: Trace, actors: list, monitor, run_dir: Path, progress: bool) -> list[dict]:
    from tqdm import tqdm

    dispatcher = Dispatcher(actors)
    bar = tqdm(total=len(trace.requests) + len(trace.rejected), desc="requests", unit="req", disable=not progress,
               dynamic_ncols=True)
    failed = [len(trace.rejected)]
    bar.update(len(trace.rejected))
    out = (run_dir / "requests.jsonl").open("w")
    for record in trace.rejected:
        out.write(json.dumps(record.to_dict()) + "\n")

    def on_record(record: RequestRecord) -> None:
        out.write(json.dumps(record.to_dict()) + "\n")
        out.flush()
        failed[0] += not record.ok
        snap = monitor.latest
        bar.set_postfix({"failed": failed[0], "tok/s": fixed(snap.get("charts/served_tokens_per_s")),
                         "MAL": fixed(snap.get("charts/mean_accepted_length")),
                         "head": snap.get("charts/head_version")}, refresh=False)
        bar.update(1)

    from actors.arrivals import RecordedSpec

    arrival = cfg.trace.arrival or RecordedSpec(kind="recorded")
    try:
        served = replay_trace(trace.requests, arrival, dispatcher, seed=cfg.seed, on_record=on_record)
    finally:
        bar.close()
        out.close()
        dispatcher.close()
    return [r.to_dict() for r in trace.rejected + served]


def _drain(client, run_id: str, cfg: RunConfig) -> None:
    """Let the learner read what the actors wrote, and train its last partial batch (fill_timeout_s)."""
    from buffer.keys import GROUP, RunKeys

    key = RunKeys(run_id).transitions
    deadline = time.monotonic() + cfg.drain_timeout_s
    while time.monotonic() < deadline:
        groups = {g["name"].decode() if isinstance(g["name"], bytes) else g["name"]: g
                  for g in client.xinfo_groups(key)} if client.exists(key) else {}
        last = groups.get(GROUP, {}).get("last-delivered-id", b"0-0")
        last = last.decode() if isinstance(last, bytes) else last
        if not client.xrange(key, "(" + last, "+", count=1):
            time.sleep(min(cfg.learner.fill_timeout_s + 0.5, max(0.0, deadline - time.monotonic())))
            return
        time.sleep(0.5)


def _first_answer(records: list[dict]) -> float | None:
    """Seconds from the start of the replay (the actors loaded) to the first request answered."""
    done = [r["done_s"] for r in records if r.get("ok") and r.get("done_s") is not None]
    return min(done) if done else None


def _versions(run_dir: Path) -> list[dict]:
    path = run_dir / "learner" / "versions.jsonl"
    return read_jsonl(path) if path.exists() else []


def _last_head(run_dir: Path) -> str | None:
    """The last published head, also linked as run_dir/head (`dvi bench --head-path run_dir/head`)."""
    heads = sorted((run_dir / "learner" / "heads").glob("v*"))
    if not heads:
        return None
    link = run_dir / "head"
    link.unlink(missing_ok=True)
    link.symlink_to(heads[-1].relative_to(run_dir), target_is_directory=True)
    return str(heads[-1])
