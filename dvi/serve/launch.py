"""`dvi serve`: the learning plane of `dvi run` (Redis, Ray, the learner group, the monitor) with a Ray Serve
application in front of it in place of a trace replay.

    run_dir/config.yaml      the resolved config (the API key left out)
    run_dir/requests.jsonl   one record per finished request, appended as they finish
    run_dir/metrics.jsonl    the monitor's snapshots and events; tb/ the same as TensorBoard scalars
    run_dir/learner/         the learner's metrics.jsonl, versions.jsonl, heads/vNNNN, checkpoints/
    run_dir/summary.json     and report.md with plots/, written at shutdown

Ctrl-C or SIGTERM drains: new requests get 503, in-flight ones get `serve.drain_timeout_s` to finish, the
learner trains what is buffered, checkpoints and publishes, then the summary and report are written.
"""
from __future__ import annotations

import json
import logging
import signal
import socket
import threading
import time
from pathlib import Path

from dvi.errors import UserError
from dvi.run.plane import LearningPlane, write_summary
from dvi.run.runner import prepare_run_dir
from dvi.serve.config import ServeConfig

APP = "dvi"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_port_free(host: str, port: int) -> None:
    """One clear line before anything starts, rather than a Serve proxy that fails to bind later."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}): choose another --port, or stop "
                            f"what uses it") from None


def serve_until_stopped(cfg: ServeConfig, *, overwrite: bool = False, stop: threading.Event | None = None,
                        on_ready=None) -> tuple[Path, dict]:
    """Serve until `stop` is set (or Ctrl-C / SIGTERM), then drain and write the summary; returns the run
    directory and its summary. `on_ready(url)` runs once the endpoint answers."""
    check_port_free(cfg.serve.host, cfg.serve.port)
    run_dir = prepare_run_dir(cfg, overwrite)
    stop = stop or threading.Event()
    with LearningPlane(cfg, run_dir) as plane:
        ingress = _deploy(cfg, plane)
        restore = _stop_on_signals(stop)  # after Ray's start, which installs its own SIGTERM handler
        try:
            replicas = ReplicaMetrics(ingress)
            plane.start(replicas.read)
            plane.generators_ready(f"{cfg.actors.count} replicas serving")
            url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1"
            _announce(cfg, url)
            if on_ready is not None:
                on_ready(url)
            records = _serve(cfg, ingress, run_dir, stop, replicas)
            counts = plane.finish()
            summary = write_summary(cfg, run_dir, records, counts, plane)
        finally:
            restore()
    return run_dir, summary


def _deploy(cfg: ServeConfig, plane: LearningPlane):
    from ray import serve

    from dvi.serve.ingress import Ingress
    from dvi.serve.replica import GenerationReplica
    from selfspec.model import resolve_model_dir
    from selfspec.model_facts import model_facts

    ep, actors = cfg.serve, cfg.actors
    model_dir = resolve_model_dir(cfg.model)  # converted once here, before the replicas race for it
    redis = plane.redis_kwargs()
    replica = GenerationReplica.options(
        num_replicas=actors.count, max_ongoing_requests=ep.max_ongoing_requests,
        max_queued_requests=ep.max_queued_requests, graceful_shutdown_timeout_s=ep.drain_timeout_s,
        ray_actor_options={"num_cpus": actors.num_cpus, "num_gpus": actors.num_gpus},
    ).bind(cfg.actor_config().model_dump_json(), plane.run_id, redis.get("redis_url"), redis.get("redis_password"))
    settings = {"served_name": cfg.served_name, "model_dir": str(model_dir),
                "max_positions": model_facts(cfg.model).max_positions or 1 << 30, "api_key": ep.key()}
    ingress = Ingress.options(num_replicas=1, max_ongoing_requests=10_000, graceful_shutdown_timeout_s=ep.drain_timeout_s,
                              ray_actor_options={"num_cpus": 0}).bind(replica, settings)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the console is for dvi's own lines; Serve logs to files
    serve.start(http_options={"host": ep.host, "port": ep.port})
    return serve.run(ingress, name=APP, route_prefix="/")


def _announce(cfg: ServeConfig, url: str) -> None:
    key = cfg.serve.key()
    auth = " -H 'Authorization: Bearer $DVI_API_KEY'" if key else ""
    body = json.dumps({"model": cfg.served_name, "messages": [{"role": "user", "content": "Hello!"}],
                       "max_tokens": 32})
    print(f"dvi serve: ready at {url} (OpenAI API; Ctrl-C drains and stops)\n"
          f"  curl {url}/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'", flush=True)
    if cfg.serve.host not in LOOPBACK and key is None:
        print(f"WARNING: listening on {cfg.serve.host} without an API key: anyone who reaches this port can use "
              "it. Set --api-key or DVI_API_KEY.", flush=True)


def _serve(cfg: ServeConfig, ingress, run_dir: Path, stop: threading.Event, replicas: "ReplicaMetrics") -> list[dict]:
    """Collect finished requests into requests.jsonl until stopped, then drain."""
    records = []
    with (run_dir / "requests.jsonl").open("a") as out:
        def collect():
            new = ingress.collect.remote().result()
            for r in new:
                out.write(json.dumps(r) + "\n")
            out.flush()
            records.extend(new)

        while not stop.wait(cfg.serve.collect_every_s):
            collect()
        print("dvi serve: draining (new requests get 503) ...", flush=True)
        ingress.drain.remote().result()
        deadline = time.monotonic() + cfg.serve.drain_timeout_s
        while ingress.running.remote().result() and time.monotonic() < deadline:
            time.sleep(0.2)
        collect()
    replicas.last = replicas.read()
    from ray import serve

    serve.shutdown()
    return records


class ReplicaMetrics:
    """The monitor's view of the replicas: their counters as the ingress last saw them; after shutdown, the
    last reading (the monitor keeps ticking while the learner finishes)."""

    def __init__(self, ingress):
        self.ingress, self.last = ingress, None

    def read(self) -> list[dict | None]:
        if self.last is not None:
            return self.last
        return [m for _, m in sorted(self.ingress.replica_metrics.remote().result(timeout_s=30).items())]


def _stop_on_signals(stop: threading.Event):
    """SIGINT and SIGTERM set `stop` (in the main thread only); returns what puts the old handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, lambda *_: stop.set())

    def restore():
        for s, handler in old.items():
            signal.signal(s, handler)
    return restore
