"""The learning plane: what `dvi run` and `dvi serve` both bring up around their generators, and wind down.

    with LearningPlane(cfg, run_dir) as plane:        # Redis (when learning), Ray, metrics.jsonl
        ... start the generators with plane.redis_kwargs() ...
        monitor = plane.start(read_metrics)          # the supervised learner group and the monitor
        ... serve: replay a trace, or answer HTTP ...
        counts = plane.finish()                      # train what is buffered, finish the learner, count
        write_summary(cfg, run_dir, records, counts, plane)
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dvi.report.format import read_jsonl
from dvi.run.config import SystemConfig
from dvi.run.files import learner_dir

if TYPE_CHECKING:  # summary imports redis; the plane imports it when it finishes
    from dvi.run.summary import LearningCounts

LOOPBACK = ("127.0.0.1", "localhost", "::1")
FINISH_TIMEOUT_S = 1800


class LearningPlane:
    def __init__(self, cfg: SystemConfig, run_dir: Path):
        self.cfg, self.run_dir, self.run_id = cfg, run_dir, cfg.run_name
        self.server = self.client = self.learner = self.monitor = None
        self.started = time.time()
        self.ready_at: float | None = None

    def __enter__(self) -> "LearningPlane":
        from buffer.server import RedisServer
        from learner.metrics_log import MetricsLog

        if self.cfg.learn:
            # first: an unreachable server is one line in a second, before Ray or a model loads
            self.server = RedisServer(self.cfg.redis, self.run_dir / "redis").start()
            self.client = self.server.client()
        try:
            self._ray = RaySession(_cpus_needed(self.cfg)).__enter__()
        except BaseException:
            self._stop_server()
            raise
        self.log = MetricsLog(self.run_dir)
        return self

    def redis_kwargs(self) -> dict:
        """How a generator reaches the stream and the weights: {} when the run does not learn."""
        if self.server is None:
            return {}
        return {"redis_url": actor_redis_url(self.server.url), "redis_password": self.server.password}

    def start(self, read_metrics):
        """The monitor, and the learner group queued (not awaited: it prepares while the generators serve)."""
        from dvi.run.monitor import Monitor
        from learner.launch import SupervisedLearner

        self.monitor = monitor = Monitor(read_metrics, self.log, self.cfg.metrics_every_s, server=self.server,
                                         run_id=self.run_id)
        if self.server is not None:
            self.learner = monitor.learner = SupervisedLearner(
                self.cfg.learner_config(self.server.url), self.cfg.learner_restarts,
                on_restart=lambda info: monitor.event("learner_restart", **info))
        monitor.start()
        return monitor

    def generators_ready(self, detail: str) -> None:
        self.ready_at = time.time()
        self.monitor.actors_ready(detail)

    def finish(self) -> LearningCounts | None:
        """Let the learner read what the generators wrote and train it, finish (checkpoint, publish, score
        every version), and return the stream's counts for the summary (None without a Redis)."""
        from buffer.stream import run_stats
        from dvi.run.summary import LearningCounts, stream_buffered

        summaries = []
        if self.learner is not None:
            _drain(self.client, self.run_id, self.cfg)
            self.monitor.learner = None  # finishing: no more restarts; the learner's status lines go on
            # finishing includes scoring every version on the held-out paths, which may still be generating
            summaries = self.learner.finish(timeout_s=FINISH_TIMEOUT_S)
            self.learner = None
        self.monitor.stop()
        if self.client is None:
            return None
        return LearningCounts(stats=run_stats(self.client, self.run_id),
                              trained=sum(s["counters"]["trained_transitions"] for s in summaries),
                              versions=_versions(self.run_dir), buffered=stream_buffered(self.client, self.run_id),
                              held_back=max((s["counters"].get("held_back", 0) for s in summaries), default=0))

    def __exit__(self, *exc):
        if self.monitor is not None:  # after finish() a no-op; after a failure, before its log closes
            self.monitor.close()
        self.log.close()
        if self.learner is not None:
            self.learner.group.shutdown()
        self._ray.__exit__(*exc)
        self._stop_server()

    def _stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()


def write_summary(cfg: SystemConfig, run_dir: Path, records: list[dict], counts: LearningCounts | None,
                  plane: LearningPlane, **extra) -> dict:
    """summary.json: the requests' numbers (dvi.run.summary), the stream's counts and the run's times."""
    from dvi.run.summary import summarize

    summary = summarize(records, cfg.window, counts)
    monitor = plane.monitor
    summary.update(run_id=plane.run_id, actors=cfg.actors.count, started_at=plane.started,
                   wall_s=time.time() - plane.started,
                   actors_ready_s=plane.ready_at - plane.started if plane.ready_at else None,
                   first_request_s=_first_answer(records), events=dict(monitor.events),
                   learner_error=monitor.learner_error, last_head=_last_head(run_dir), **extra)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


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


def _cpus_needed(cfg: SystemConfig) -> float:
    learner = cfg.learner.placement
    return cfg.actors.count * cfg.actors.num_cpus + (learner.ranks * learner.num_cpus if cfg.learn else 0)


def actor_redis_url(url: str) -> str:
    """On a multi-node cluster a loopback address means the driver's node: actors elsewhere need its IP."""
    import ray
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname
    if host not in LOOPBACK or len([n for n in ray.nodes() if n["Alive"]]) < 2:
        return url
    return url.replace(host, ray.util.get_node_ip_address(), 1)


def _drain(client, run_id: str, cfg: SystemConfig) -> None:
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
    """Seconds from the start of serving (the generators loaded) to the first request answered."""
    done = [r["done_s"] for r in records if r.get("ok") and r.get("done_s") is not None]
    return min(done) if done else None


def _versions(run_dir: Path) -> list[dict]:
    path = learner_dir(run_dir) / "versions.jsonl"
    return read_jsonl(path) if path.exists() else []


def _last_head(run_dir: Path) -> str | None:
    """The last published head, also linked as run_dir/head (`dvi bench --head-path run_dir/head`)."""
    from learner.publish import published_heads

    heads = published_heads(learner_dir(run_dir))
    if not heads:
        return None
    last = heads[max(heads)]
    link = run_dir / "head"
    link.unlink(missing_ok=True)
    link.symlink_to(last.relative_to(run_dir), target_is_directory=True)
    return str(last)
