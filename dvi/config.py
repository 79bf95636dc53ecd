"""Typed configs from YAML: a malformed file names the key and the problem in one line."""
from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    pass


def cli_overrides(sets: list[str], flags: dict, example: str) -> dict:
    """`--set KEY=VALUE` items (YAML values, dotted keys), then the flags a user gave: a flag left
    unset (None) does not clobber a `--set` of the same key."""
    pairs = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. {example}")
        pairs[key.strip()] = yaml.safe_load(value)
    return {**pairs, **{key: value for key, value in flags.items() if value is not None}}


def set_dotted(data: dict, dotted: str, value, sep: str = ".") -> dict:
    """data["a"]["b"] = value for dotted "a.b", creating the sections on the way; returns data."""
    *parents, leaf = dotted.split(sep)
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return data


def load_config(model: type[T], path: str | Path | None = None, overrides: dict | None = None) -> T:
    """Read YAML (if given), apply CLI overrides (dotted keys allowed: `head.lora_rank`), validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_dotted(data, dotted, value)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{path or 'config'}: {problems}") from None
