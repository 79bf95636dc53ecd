"""Build the pieces a decoding command needs from names: model, split, drafter head, length policy."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from selfspec.decode_steps import StaticSteps, decode_steps
from selfspec.defaults import POLICIES
from selfspec.device import resolve_device, resolve_dtype
from selfspec.config import HeadConfig
from selfspec.drafter import DrafterHead, load_head
from selfspec.length_policy import ConfidenceThreshold, CostAware, LengthPolicy
from selfspec.model import load_model
from selfspec.split import SplitModel
from selfspec.step_costs import measure_step_costs


@dataclass
class Drafter:
    model: object
    tokenizer: object
    split: SplitModel
    head: DrafterHead
    meta: dict  # checkpoint metadata ({} for an untrained head)
    dtype_reason: str = ""  # why the model runs in its dtype (selfspec.device.resolve_dtype)
    # What runs the decode passes (selfspec.decode_steps; None: its `auto`), shared by every decoder built
    # on this drafter, one request at a time.
    steps: SplitModel | StaticSteps | None = None

    def __post_init__(self):
        if self.steps is None:
            self.steps = decode_steps(self.split)


@dataclass(frozen=True)
class Placement:
    """Where and how a model runs: `device` and `dtype` as selfspec.device resolves them (None / "auto": CUDA
    when available; float32), `steps` as selfspec.decode_steps takes it (auto: CUDA graphs on a GPU). The
    commands fill it from --device, --dtype and --steps; as a library call it defaults to the CPU in float32."""
    device: torch.device | str | None = "cpu"
    dtype: torch.dtype | str | None = "float32"
    steps: str = "auto"


def load_drafter(model_spec: str, exit_layer: int = 4, drafter_path: str | None = None,
                 head_config: HeadConfig | None = None, placement: Placement = Placement()) -> Drafter:
    """The model split at `exit_layer` with an untrained head, or with the head saved at `drafter_path`
    (whose own exit layer then wins), placed as `placement` says."""
    device = resolve_device(placement.device)
    dtype, reason = resolve_dtype(placement.dtype, device)
    model, tokenizer = load_model(model_spec, dtype, device)
    if drafter_path is not None:
        split, head, meta = load_head(model, drafter_path)
    else:
        split = SplitModel(model, exit_layer)
        head, meta = DrafterHead(split, head_config or HeadConfig()), {}
    return Drafter(model, tokenizer, split, head, meta, reason, decode_steps(split, placement.steps))


def make_policy(name: str, gamma: int, split: SplitModel | StaticSteps | None = None,
                head: DrafterHead | None = None) -> LengthPolicy:
    """`split`: what will run the passes (a cost-aware policy measures their costs on it)."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if name == "fixed":
        return LengthPolicy(gamma)
    if name == "threshold":
        return ConfidenceThreshold(gamma)
    if name == "cost_aware":
        # the policy may pick any length up to gamma, so measure verify costs up to gamma + 1 tokens
        return CostAware(measure_step_costs(split, head, gamma), gamma)
    raise ValueError(f"unknown length policy {name!r}: choose one of {', '.join(POLICIES)}")
