"""Build the pieces a decoding command needs from names: model, split, drafter head, length policy."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from selfspec.passes import PassRunner, pass_runner
from selfspec.defaults import POLICIES
from selfspec.device import resolve_device, resolve_dtype
from selfspec.config import HeadConfig
from selfspec.drafter import DrafterHead, load_head
from selfspec.length_policy import ConfidenceThreshold, CostAware, LengthPolicy
from selfspec.model import load_model
from selfspec.split import SplitModel
from selfspec.pass_costs import measure_pass_costs


@dataclass
class ModelParts:
    """A loaded model, split at its exit layer, with its drafter head and what runs its passes."""
    model: object
    tokenizer: object
    split: SplitModel
    head: DrafterHead
    meta: dict  # checkpoint metadata ({} for an untrained head)
    dtype_reason: str = ""  # why the model runs in its dtype (selfspec.device.resolve_dtype)
    # What runs the decode passes (selfspec.passes; None: its `auto`), shared by every decoder built
    # on these parts, one request at a time.
    passes: PassRunner | None = None

    def __post_init__(self):
        if self.passes is None:
            self.passes = pass_runner(self.split)


@dataclass(frozen=True)
class DeviceSettings:
    """Where and how a model runs: `device` and `dtype` as selfspec.device resolves them (None / "auto": CUDA
    when available; float32), `passes` as selfspec.passes takes it (auto: CUDA graphs on a GPU). The
    commands fill it from --device, --dtype and --passes; as a library call it defaults to the CPU in float32."""
    device: torch.device | str | None = "cpu"
    dtype: torch.dtype | str | None = "float32"
    passes: str = "auto"


def load_model_parts(model_spec: str, exit_layer: int = 4, head_path: str | None = None,
                 head_config: HeadConfig | None = None, settings: DeviceSettings = DeviceSettings()) -> ModelParts:
    """The model split at `exit_layer` with an untrained head, or with the head saved at `head_path`
    (whose own exit layer then wins), placed as `settings` say."""
    device = resolve_device(settings.device)
    dtype, reason = resolve_dtype(settings.dtype, device)
    model, tokenizer = load_model(model_spec, dtype, device)
    if head_path is not None:
        split, head, meta = load_head(model, head_path)
    else:
        split = SplitModel(model, exit_layer)
        head, meta = DrafterHead(split, head_config or HeadConfig()), {}
    return ModelParts(model, tokenizer, split, head, meta, reason, pass_runner(split, settings.passes))


def make_length_policy(name: str, gamma: int, passes: PassRunner | None = None,
                head: DrafterHead | None = None, batch_sizes: tuple[int, ...] = (1,)) -> LengthPolicy:
    """`passes`: what will run the passes (a cost-aware policy measures their costs on it, at `batch_sizes`:
    the batches its decoder will run, or `cost_batch_sizes(max_batch)`)."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if name == "fixed":
        return LengthPolicy(gamma)
    if name == "threshold":
        return ConfidenceThreshold(gamma)
    if name == "cost_aware":
        # the policy may pick any length up to gamma, so measure verify costs up to gamma + 1 tokens
        return CostAware(measure_pass_costs(passes, head, gamma, batch_sizes), gamma)
    raise ValueError(f"unknown length policy {name!r}: choose one of {', '.join(POLICIES)}")


def cost_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a cost-aware policy times for a decoder of up to `max_batch` sequences: 1, 2, 4, ...
    and max_batch itself (costs in between are interpolated)."""
    return tuple(sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)}))
