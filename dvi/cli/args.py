"""Arguments shared by the decoding commands."""
from __future__ import annotations

import warnings

from selfspec.defaults import DEFAULT_MODEL

# selfspec.device.DTYPE_CHOICES and selfspec.decode_steps.STEP_MODES, repeated here: building the parser
# (`dvi --help`) must not import torch.
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
STEP_MODES = ("auto", "eager", "static", "graphs")


def add_model_args(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a local Hugging Face model directory or `{DEFAULT_MODEL}` (default)")
    p.add_argument("--exit-layer", "-k", type=int, default=4, help="draft from layer k's hidden state (default: 4)")
    p.add_argument("--drafter", default=None,
                   help="a trained drafter head directory (from `dvi online`); its exit layer wins")
    add_device_args(p)
    p.add_argument("--steps", default="auto", choices=STEP_MODES,
                   help="how decode passes run: graphs = CUDA graphs over a static KV cache, static = the same "
                        "passes eagerly, eager = per-layer cache lengths (default: auto = graphs on CUDA, else eager)")


def load_drafter_from(args, drafter_path: str | None = None):
    """selfspec.loading.load_drafter with the arguments add_model_args added (`drafter_path` overrides --drafter)."""
    from selfspec.loading import Placement, load_drafter

    return load_drafter(args.model, args.exit_layer, drafter_path or args.drafter,
                        placement=Placement(args.device, args.dtype, args.steps))


def add_device_args(p, dtype_default: str | None = "auto") -> None:
    """`--device` and `--dtype` (resolved by selfspec.device); a command whose config has a dtype key
    passes dtype_default=None so that the flag left unset does not override it."""
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu)")
    p.add_argument("--dtype", default=dtype_default, choices=DTYPE_CHOICES,
                   help="model precision (default: auto = float32 on CPU and on CUDA: bfloat16 measured "
                        "2-5x slower at batch 1 on an H200 and departed from hf_ar's greedy output)")


def quiet_transformers() -> None:
    """Hide transformers' deprecation chatter and per-call progress bars; keep real errors."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
