"""Arguments shared by the decoding commands."""
from __future__ import annotations

import warnings

from selfspec.defaults import DEFAULT_MODEL


def add_model_args(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a local Hugging Face model directory or `{DEFAULT_MODEL}` (default)")
    p.add_argument("--exit-layer", "-k", type=int, default=4, help="draft from layer k's hidden state (default: 4)")
    p.add_argument("--drafter", default=None,
                   help="a trained drafter head directory (from `dvi online`); its exit layer wins")


def quiet_transformers() -> None:
    """Hide transformers' deprecation chatter and per-call progress bars; keep real errors."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
