"""Several learner ranks as Ray actors forming one DeepSpeed group.

Each rank is an actor placed by `placement` (num_cpus / num_gpus per rank). Rank 0's actor picks the
rendezvous address (its node's IP and a free port); every actor then sets MASTER_ADDR/PORT, RANK,
WORLD_SIZE, LOCAL_RANK and joins (gloo on CPU, nccl on GPU; Ray gives each GPU actor its own device,
so LOCAL_RANK is 0). Every rank reads its share of the stream through the `learners` consumer group
under its own consumer name; rank 0 publishes and scores. Only numpy arrays and plain data cross the
actor boundary.
"""
from __future__ import annotations

import os

import numpy as np
import ray

from learner.config import LearnerConfig


@ray.remote
class LearnerRank:
    def __init__(self, cfg_json: str):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self.cfg = LearnerConfig.model_validate_json(cfg_json)
        self.learner = self.log = None
        self.setup_error: str | None = None

    def address(self) -> tuple[str, int]:
        from learner.dist import free_port

        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def pid(self) -> int:
        return os.getpid()

    def setup(self, rank: int, world_size: int, address: tuple[str, int], resume: bool, record_ids: bool) -> None:
        from learner.rank import RankAddress, build_rank

        place = RankAddress(rank, world_size, *address)
        try:
            self.learner, self.log = build_rank(self.cfg, place, resume=resume, record_ids=record_ids)
        except Exception as err:
            self.setup_error = f"{type(err).__name__}: {err}"
            raise

    def run(self, steps: int | None = None) -> dict:
        from learner.rank import summary

        if self.learner is None:  # run() is queued behind setup(): say why there is nothing to run
            raise RuntimeError(f"learner rank set-up failed: {self.setup_error}")
        self.learner.run(steps)
        return summary(self.learner)

    def parameters(self) -> dict[str, np.ndarray]:
        return self.learner.parameters()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


class LearnerGroup:
    """`placement.ranks` learner ranks; `run()` trains until the config's stop conditions, `stop()`
    asks every rank to finish (publish, checkpoint, acknowledge) at its next step. Creating the group
    waits for nothing: each rank's set-up (model, held-out paths, draft vocabulary) and then its loop
    are queued on its actor, so serving starts while the learner prepares."""

    def __init__(self, cfg: LearnerConfig, *, resume: bool = False, record_ids: bool = False):
        from learner.rank import clear_stop

        self.cfg = cfg
        p = cfg.placement
        clear_stop(cfg)  # here, before any rank starts: a stop() from now on is never lost
        self.actors = [LearnerRank.options(num_cpus=p.num_cpus, num_gpus=p.num_gpus).remote(cfg.model_dump_json())
                       for _ in range(p.ranks)]
        self._pid_refs = [a.pid.remote() for a in self.actors]
        address = self.actors[0].address.remote()  # resolved by Ray before the set-ups start
        # All ranks join at once: joining the group blocks until the last one arrives.
        # A failed set-up surfaces through that rank's run(); the refs are held so that Ray does not also
        # report the error as unhandled when they are collected.
        self._setups = [a.setup.remote(r, p.ranks, address, resume, record_ids) for r, a in enumerate(self.actors)]

    @property
    def pids(self) -> list[int]:
        """The ranks' process ids, once their processes run (never blocks)."""
        ready, _ = ray.wait(self._pid_refs, num_returns=len(self._pid_refs), timeout=0)
        return ray.get(ready) if len(ready) == len(self._pid_refs) else []

    def run(self, steps: int | None = None) -> list[dict]:
        return ray.get(self.start(steps))

    def start(self, steps: int | None = None) -> list[ray.ObjectRef]:
        """Every rank's `run`, without waiting: one ref per rank, each its summary when the loop ends."""
        return [a.run.remote(steps) for a in self.actors]

    def parameters(self) -> list[dict[str, np.ndarray]]:
        return ray.get([a.parameters.remote() for a in self.actors])

    def stop(self) -> None:
        from buffer.keys import RunKeys
        from learner.rank import connect_redis

        connect_redis(self.cfg).set(RunKeys(self.cfg.run_id).learner_stop, 1)

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.get(actor.close.remote(), timeout=30)
            except (ray.exceptions.RayError, TimeoutError):  # a dead rank has nothing to close
                pass
            ray.kill(actor)


class SupervisedLearner:
    """A LearnerGroup that outlives its ranks: when a rank dies (killed, out of memory), the rest are
    stopped and a new group resumes from the last checkpoint (fresh if none was written yet), so every
    transition is still trained exactly once. `poll()` from a monitoring loop, `finish()` at the end."""

    def __init__(self, cfg: LearnerConfig, max_restarts: int, on_restart=None):
        self.cfg, self.max_restarts, self.on_restart = cfg, max_restarts, on_restart
        self.restarts = 0
        self.group = LearnerGroup(cfg)
        self.refs = self.group.start()

    def poll(self) -> None:
        """Restart the group if a rank has died (blocks while the new ranks load)."""
        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as err:
                self._restart(err)
                return

    def finish(self, timeout_s: float = 300) -> list[dict]:
        """Stop every rank at its next step (publish what is unpublished, checkpoint, acknowledge);
        returns the ranks' summaries."""
        self.group.stop()
        try:
            return ray.get(self.refs, timeout=timeout_s)
        finally:
            self.group.shutdown()

    def _restart(self, err: Exception) -> None:
        from learner.checkpoint import Checkpoints

        if self.restarts >= self.max_restarts:
            raise RuntimeError(f"the learner failed {self.restarts + 1} times; last: {err}") from err
        self.restarts += 1
        self.group.shutdown()
        resume = Checkpoints(self.cfg.checkpoint_dir, 0, self.cfg.placement.ranks).latest_tag() is not None
        if self.on_restart is not None:
            self.on_restart({"restart": self.restarts, "resume": resume, "error": str(err).splitlines()[0]})
        self.group = LearnerGroup(self.cfg, resume=resume)
        self.refs = self.group.start()
