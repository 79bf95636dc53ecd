"""Build the pieces a decoding command needs from names: model, split, drafter head, length policy."""
from __future__ import annotations

from dataclasses import dataclass

from selfspec.defaults import POLICIES
from selfspec.drafter import DrafterHead, HeadConfig, load_head
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


def load_drafter(model_spec: str, exit_layer: int = 4, drafter_path: str | None = None,
                 head_config: HeadConfig | None = None) -> Drafter:
    """The model split at `exit_layer` with an untrained head, or with the head saved at `drafter_path`
    (whose own exit layer then wins)."""
    model, tokenizer = load_model(model_spec)
    if drafter_path is not None:
        return Drafter(model, tokenizer, *load_head(model, drafter_path))
    split = SplitModel(model, exit_layer)
    return Drafter(model, tokenizer, split, DrafterHead(split, head_config or HeadConfig()), {})


def make_policy(name: str, gamma: int, split: SplitModel | None = None, head: DrafterHead | None = None) -> LengthPolicy:
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
