"""A drafter head as data, without torch: its weights (arrays, meta), on disk, and whether they fit.

arrays: the head's trainable parameters (float32 when trained in bf16: numpy has no bfloat16) and
`vocab_ids` (int64, its draft vocabulary, when reduced). meta: {"head": its HeadConfig as a dict,
"exit_layer": where its split exits, ...} plus what the writer adds (base_model, version, step, ...).
`selfspec.drafter.head_weights` / `head_from_weights` turn a DrafterHead into these and back; a
published version carries them over Redis (buffer/weights.py) and a saved head holds them on disk
(`write_head` / `read_head`): head.safetensors (the arrays) and head.json (the meta).

`HeadSpec.problem` is the one rule for whether weights fit where they are loaded (the same arrays
with the same dtypes and shapes, at the same exit layer, of the same base model): the weight store
applies it to a pulled blob, `head_from_weights` to whatever it loads (a saved head, a blob).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

HEAD_META, HEAD_ARRAYS = "head.json", "head.safetensors"


class HeadMismatch(ValueError):
    """Weights that do not fit where they are loaded (HeadSpec.problem says why)."""


@dataclass(frozen=True)
class HeadSpec:
    """What weights must be to replace a head's: each array's dtype and shape, and the exit layer and the
    base model where known (None: not checked)."""
    arrays: dict[str, tuple[np.dtype, tuple[int, ...]]]
    exit_layer: int | None = None
    base_model: str | None = None

    @classmethod
    def of(cls, arrays: dict[str, np.ndarray], meta: dict, base_model: str | None = None) -> "HeadSpec":
        """The spec of a head's weights (its `exit_layer` from meta), optionally of a named base model."""
        return cls({name: (a.dtype, a.shape) for name, a in arrays.items()}, meta.get("exit_layer"), base_model)

    def problem(self, arrays: dict[str, np.ndarray], meta: dict) -> str | None:
        """What is wrong with these weights for this head, or None. Weights whose meta does not name an
        exit layer are taken to be at this one."""
        if self.base_model is not None and meta.get("base_model") != self.base_model:
            return f"base model {meta.get('base_model')!r}, expected {self.base_model!r}"
        if self.exit_layer is not None and meta.get("exit_layer", self.exit_layer) != self.exit_layer:
            return f"exit layer {meta['exit_layer']}, expected {self.exit_layer}"
        if set(arrays) != set(self.arrays):
            return (f"parameters missing {sorted(set(self.arrays) - set(arrays))}, "
                    f"unexpected {sorted(set(arrays) - set(self.arrays))}")
        for name, (dtype, shape) in self.arrays.items():
            a = arrays[name]
            if a.dtype != dtype:
                return f"{name}: dtype {a.dtype}, expected {np.dtype(dtype)}"
            if a.shape != tuple(shape):
                return f"{name}: shape {a.shape}, expected {tuple(shape)}"
        return None

    def to_precision(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`arrays` with each floating one at this spec's float dtype, the rest as they are: a loader's
        (head_from_weights) head takes weights at its model's precision, e.g. a head trained in float64
        loaded on a float32 model."""
        def cast(name: str, a: np.ndarray) -> np.ndarray:
            dtype = np.dtype(self.arrays[name][0]) if name in self.arrays else a.dtype
            return a.astype(dtype) if a.dtype.kind == dtype.kind == "f" else a
        return {name: cast(name, a) for name, a in arrays.items()}

    def check(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Raise HeadMismatch with the problem, if there is one."""
        problem = self.problem(arrays, meta)
        if problem:
            raise HeadMismatch(f"the head's weights do not fit: {problem}")


def head_root(path: str | Path) -> Path:
    """A saved head's directory, given it or its head.json; FileNotFoundError unless both files are there."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    if not (root / HEAD_META).is_file() or not (root / HEAD_ARRAYS).is_file():
        raise FileNotFoundError(f"no drafter checkpoint at {path}: expected {HEAD_META} and {HEAD_ARRAYS} "
                                f"(written by `dvi online --out-dir`)")
    return root


def read_head_meta(root: Path) -> dict:
    """A saved head's head.json, with its exit layer under `exit_layer` (heads saved before the split owned
    the exit layer keep it in their head config). ValueError if it is not a head's metadata."""
    try:
        meta = json.loads((root / HEAD_META).read_text())
        config = dict(meta["head"])
        legacy = config.pop("exit_layer", None)
        exit_layer = int(meta.get("exit_layer") or legacy)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{root / HEAD_META}: not a head's metadata ({type(err).__name__}: {err})") from None
    return {**meta, "head": config, "exit_layer": exit_layer}


def write_head(out_dir: str | Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Save weights: head.safetensors (the arrays) and head.json (the meta) in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(out / HEAD_ARRAYS))
    (out / HEAD_META).write_text(json.dumps(meta, indent=2))
    return out


def read_head(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """The weights saved by write_head (its directory or head.json): (arrays, meta)."""
    root = head_root(path)
    return load_file(str(root / HEAD_ARRAYS)), read_head_meta(root)
