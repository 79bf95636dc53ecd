"""The run's watcher, on its own thread from the start of the run: every `every_s` it restarts a learner
whose rank died and a Redis server that died, prints what the learner is doing (set-up, draft
vocabulary, held-out paths) on the console, and once the actors serve reads their metrics and writes
one line of `metrics.jsonl` (and TensorBoard scalars) with the interval's served speed, MAL, head
version and lag. The replay loop never blocks on any of this."""
from __future__ import annotations

import threading
import time
from collections import Counter

import ray
import redis

from buffer.weights import WeightStore
from learner.status import read_status

STATUS_EVERY_S = 10.0  # a learner activity's progress line at most this often (its first and last always)


def actor_metrics(actors: list, timeout_s: float):
    """What a monitor reads from Ray generation actors: each one's metrics, None for one restarting or busy."""
    def read() -> list[dict | None]:
        refs = [a.metrics.remote() for a in actors]
        out = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=timeout_s))
            except (ray.exceptions.RayError, TimeoutError):
                out.append(None)
        return out
    return read


class Monitor:
    """`read_metrics()`: each generator's GenerationWorker.metrics (None when it did not answer), in a stable
    order: `dvi run` asks its actors (actor_metrics), `dvi serve` its ingress."""

    def __init__(self, read_metrics, log, every_s: float, *, learner=None, server=None, run_id=""):
        self.read_metrics, self.log, self.every_s = read_metrics, log, every_s
        self.learner, self.server = learner, server
        self.client = server.client() if server is not None else None
        self.run_id = run_id
        self.weights = WeightStore(self.client, run_id) if server is not None else None
        self.serving = False  # actors loaded: from now on each tick reads their metrics
        self._status: dict[str, tuple[str, float]] = {}  # activity -> (line printed, when)
        self.events: Counter = Counter()
        self.latest: dict = {}  # the last snapshot, for the progress bar
        self.learner_error: str | None = None
        self._previous: dict[int, dict] = {}
        self._version = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dvi-run-monitor", daemon=True)
        self._start = self._last = time.monotonic()
        self._step = 0

    def start(self) -> "Monitor":
        self._start = self._last = time.monotonic()
        self._thread.start()
        return self

    def actors_ready(self, detail: str) -> None:
        self._last = time.monotonic()
        self.serving = True
        self.event("actors_ready", detail=detail)

    def stop(self) -> None:
        """Stop the thread after one last snapshot (so the end of the run is in metrics.jsonl)."""
        self.close()
        self.tick()

    def close(self) -> None:
        """Stop the thread (a run that failed: no last snapshot)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def event(self, name: str, **detail) -> None:
        self.events[name] += 1
        self.log({"t": round(time.monotonic() - self._start, 3), "step": self._step, "event": name, **detail})

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.tick()

    def tick(self) -> None:
        self._check_redis()
        self._check_learner()
        self._report_learner()
        self._check_versions()
        if self.serving:
            self._snapshot()

    def _check_redis(self) -> None:
        if self.server is not None and self.server.died():
            self.server.restart()
            self.event("redis_restart", detail=f"redis-server restarted on port {self.server.port} from its AOF")

    def _check_learner(self) -> None:
        if self.learner is None or self.learner_error is not None:
            return
        try:
            self.learner.poll()
        except RuntimeError as err:  # out of restarts: serving goes on, the summary says why learning stopped
            self.learner_error = str(err)
            self.event("learner_failed", detail=self.learner_error)

    def _report_learner(self) -> None:
        """A console line (and an event) when a learner activity's line changed: the run never looks hung
        while the learner prepares."""
        from tqdm import tqdm

        if self.client is None:
            return
        try:
            status = read_status(self.client, self.run_id)
        except redis.RedisError:
            return
        now = time.monotonic()
        for activity, line in sorted(status.items()):
            printed, when = self._status.get(activity, (None, -STATUS_EVERY_S))
            if line == printed or (now - when < STATUS_EVERY_S and "/" in line and "(done)" not in line):
                continue
            self._status[activity] = (line, now)
            tqdm.write(f"[learner] {line}")
            self.event("learner_status", activity=activity, detail=line)

    def _check_versions(self) -> None:
        if self.weights is None:
            return
        try:
            latest = self.weights.latest_version()
        except redis.RedisError:
            return
        if latest is not None and latest != self._version:
            self._version = latest
            self.event("versions", latest=self._version)

    def _snapshot(self) -> None:
        now = time.monotonic()
        metrics = self.read_metrics()
        delta = Counter()
        for i, m in enumerate(metrics):
            if m is None:
                continue
            before = self._previous.get(i)
            if before is not None and before["pid"] != m["pid"]:
                self.event("actor_restart", actor=i, detail=f"actor {i} came back as pid {m['pid']}")
                before = None  # a restarted actor counts from zero
            for key in ("tokens", "decode_s", "rounds", "accepted", "batch_rounds"):
                delta[key] += m[key] - (before[key] if before else 0)
            self._previous[i] = m
        live = [m for m in metrics if m is not None]
        versions = [m["head_version"] for m in live if m["head_version"] is not None]
        lags = [m["head_lag"] for m in live if m["head_lag"] is not None]
        interval = now - self._last
        self._last = now
        record = {
            "t": round(now - self._start, 3), "step": self._step, "event": "actors",
            "requests_done": sum(m["requests_done"] for m in live),
            "requests_failed": sum(m["requests_failed"] for m in live),
            "charts/served_tokens_per_s": delta["tokens"] / interval if interval > 0 else None,
            "charts/actor_tokens_per_s": delta["tokens"] / delta["decode_s"] if delta["decode_s"] > 0 else None,
            "charts/mean_accepted_length": delta["accepted"] / delta["rounds"] + 1 if delta["rounds"] else None,
            "charts/head_version": min(versions) if versions else None,
            "charts/head_lag": max(lags) if lags else None,
            "charts/queue_depth": sum(m["queue_depth"] for m in live),
            # sequences per batched round over the interval: how much continuous batching batches
            "charts/batch_size": delta["rounds"] / delta["batch_rounds"] if delta["batch_rounds"] else None,
            "actors": metrics,
            # where each process is, for an operator (and the fault tests) to find it
            "learner_pids": list(self.learner.group.pids) if self.learner is not None else [],
            "redis_pid": self.server.pid if self.server is not None else None,
        }
        self._step += 1
        self.latest = record
        self.log(record)
