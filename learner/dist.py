"""torch.distributed for the learner ranks: environment, process group, and the one small collective
that keeps the ranks' loops in step.

DeepSpeed reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them it reaches for
MPI. One process alone gets world size 1 on a free loopback port. gloo on CPU, nccl on a GPU.
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import torch


STALE_LOCK_S = 600


def env_defaults() -> None:
    """Set before DeepSpeed is imported: which accelerator, and where its one small op is built (once)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dvi" / "torch_extensions"))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    clear_stale_build_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"]))


def clear_stale_build_locks(root: Path) -> None:
    """Every process that loads the op holds `lock` while ninja checks the build (about a second); a
    process killed meanwhile (a SIGKILLed learner rank) leaves it behind, and torch then waits for it
    forever. A lock older than STALE_LOCK_S is such a leftover."""
    import time

    for lock in root.glob("*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
                lock.unlink()
                logging.getLogger(__name__).warning("removed a stale build lock %s", lock)
        except FileNotFoundError:
            pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def init_distributed(rank: int = 0, world_size: int = 1, master_addr: str = "127.0.0.1",
                     master_port: int | None = None, local_rank: int = 0) -> None:
    """Join the learners' process group (a no-op if this process is already in one)."""
    env_defaults()
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would drown the learner's own
    if not torch.cuda.is_available() and os.environ.get("DVI_SHM_ALLREDUCE") != "1":
        # DeepSpeed's CPU backend JIT-builds a shared-memory allreduce on first use in every new environment
        # (each fresh virtualenv compiles it again, for tens of seconds). It only speeds up collectives between
        # CPU ranks on one machine, and gloo carries the head's small gradients well enough.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != world_size:
            raise RuntimeError(f"this process is already in a group of {torch.distributed.get_world_size()} ranks")
        return
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR=master_addr, MASTER_PORT=str(master_port or free_port(master_addr)))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def sync_min(values: list[float]) -> list[float]:
    """Element-wise minimum over the ranks (identity with one rank). A maximum is the minimum of the
    negatives, so one all-reduce carries both kinds of flag."""
    if torch.distributed.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return t.tolist()


def sync_sum(values: list[float]) -> list[float]:
    if torch.distributed.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def broadcast_ids(ids: torch.Tensor | None, size: int | None) -> torch.Tensor | None:
    """Rank 0's int64 vector (e.g. the draft vocabulary) on every rank; `size` known to all ranks."""
    if size is None or torch.distributed.get_world_size() == 1:
        return ids
    t = (ids if torch.distributed.get_rank() == 0 else torch.empty(size, dtype=torch.long)).to(device())
    torch.distributed.broadcast(t, src=0)
    return t.cpu()
