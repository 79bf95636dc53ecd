"""What a result was measured with: the installed versions of the packages that set its speed, and the machine.

Every bench and run JSON records `package_versions()` under `versions`: a speed ratio moves when a package
does (hf_ar, the baseline of every ratio, ran 13% faster under a newer transformers while dvi's own tokens/s
did not move), so a number is only comparable to another measured with the same versions. The versions a
fresh install takes are pinned in constraints.txt (`make lock` renews it deliberately).

No torch import here: torch's CUDA device is named only when the caller has imported torch already.
"""
from __future__ import annotations

import importlib.metadata
import platform
import sys

# The packages whose version can move a result: the model stack, the system's parts, the numbers' types.
PACKAGES = ("torch", "transformers", "ray", "deepspeed", "redis", "msgpack", "numpy", "peft", "pydantic")


def package_versions() -> dict[str, str | None]:
    """{"python", "machine", "cpu", every PACKAGES name (None where not installed), "cuda_device" when torch
    is imported and sees a GPU}: strings, JSON-serialisable."""
    out = {"python": platform.python_version(), "machine": platform.machine(), "cpu": cpu_name()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                out["cuda_device"] = torch.cuda.get_device_name()
                out["cuda"] = torch.version.cuda
        except Exception:  # noqa: BLE001 - a broken driver must not stop a result from being written
            pass
    return out


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows (may be empty)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()
