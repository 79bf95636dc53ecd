"""Where a model runs and in what precision: `--device` and `--dtype` of the decoding commands.

`resolve_device(None)` is CUDA when torch sees a GPU, else the CPU. `resolve_dtype("auto", device)` is
float32 on both for now: on an H200 at batch 1 with eager passes, bfloat16 measured 2-5x slower than
float32 (the 135M model is launch-bound, not bandwidth-bound) and its greedy output departed from hf_ar's
on 6 of 8 prompts, so it is only used when asked for until it is measured with CUDA graphs
(scripts/gpu_check.sh, docs/gpu.md). `synchronize(device)` waits for queued GPU work before a
clock is read; on the CPU it does nothing.
"""
from __future__ import annotations

import contextlib
import os

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)  # dvi.cli.args repeats them: building the CLI parser loads no torch
AUTO_REASONS = {
    "cpu": "auto: float32 on the CPU",
    "cuda": "auto: float32 on CUDA (bfloat16 measured 2-5x slower at batch 1 on an H200 with eager passes and "
            "its greedy output diverged from hf_ar on 6/8 prompts)",
}


class DeviceError(ValueError):
    """A device or dtype this machine cannot give; the message is one line a user can act on."""


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """`cuda`, `cuda:N`, `cpu` (or None/`auto`: CUDA when available, else CPU) -> a torch.device that exists here."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {str(name)!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                              f"built for CUDA {torch.version.cuda or 'none'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device {str(name)!r}: use cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | str) -> tuple[torch.dtype, str]:
    """(dtype, why): `auto` (or None) picks per device (float32 for now, see the module doc); a name in
    DTYPES, or a torch.dtype, is taken as asked."""
    if isinstance(name, torch.dtype):
        return name, "requested"
    if name is None or name == "auto":
        kind = torch.device(device).type
        return torch.float32, AUTO_REASONS.get(kind, f"auto: float32 on {kind}")
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name], "requested"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); a no-op on the CPU."""
    if device is None:
        return
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if kind == "cuda":
        torch.cuda.synchronize(device)


def decode_attention(device: torch.device):
    """The attention kernels a decode pass may use on CUDA: every SDPA backend but cuDNN's, unless
    DVI_DECODE_CUDNN_SDPA=1. PyTorch prefers cuDNN attention on Hopper for 16-bit inputs, and cuDNN
    builds an execution plan for every new shape: eagerly, a decode step's key length is new at every
    step. That is the suspected cause of bfloat16 decoding 2-5x slower than float32 on an H200 (float32
    never reaches cuDNN); scripts/gpu_check.sh profiles both settings. Nothing changes on the CPU."""
    if device.type != "cuda" or os.environ.get("DVI_DECODE_CUDNN_SDPA") == "1":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
