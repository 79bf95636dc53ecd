"""Data sets dvi can download: a small registry (name -> pinned URL, sha256, place in the cache).

`dvi data fetch spec-bench` writes Spec-Bench's question.jsonl to `$DVI_CACHE_DIR/data/spec_bench/question.jsonl`
(default ~/.cache/dvi); `--prompts spec-bench`, `workload: spec-bench` and `{kind: spec_bench}` trace sources
read it from there. An environment variable per data set (DVI_SPEC_BENCH for Spec-Bench) names a local
copy instead and takes precedence over the cache.

Light on purpose (stdlib and tqdm only): `dvi data` must not import torch.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import ssl
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from selfspec.cache import cache_dir

SPEC_BENCH_COMMIT = "fd2c1cd7d2201ef71db4c5f4e455008f017967bf"  # hemingkx/Spec-Bench main, 2025-04-22 (file unchanged since 2024-02-21)


@dataclass(frozen=True)
class Dataset:
    name: str
    title: str  # what the file is, for messages
    url: str  # pinned: the bytes behind it never change
    sha256: str
    relative_path: str  # under {cache_dir}/data
    env: str  # an environment variable naming a local copy; wins over the cache
    size: int | None = None  # bytes, for the progress bar when the server does not say

    @property
    def hint(self) -> str:
        return f"run `dvi data fetch {self.name}` (or set {self.env} to a local {Path(self.relative_path).name})"


DATASETS: dict[str, Dataset] = {
    "spec-bench": Dataset(
        name="spec-bench",
        title="Spec-Bench questions",
        url=f"https://raw.githubusercontent.com/hemingkx/Spec-Bench/{SPEC_BENCH_COMMIT}/data/spec_bench/question.jsonl",
        sha256="4b6d33e79484f9841c487ee87d1cf6aa8c6066f61d5d482ff09e5a007fafdf04",
        relative_path="spec_bench/question.jsonl",
        env="DVI_SPEC_BENCH",
        size=698768,
    ),
}

CONNECT_TIMEOUT_S = 30.0  # urllib's timeout: the connection and then every read
CHUNK = 1 << 16


class ChecksumError(ValueError):
    """The downloaded bytes are not the pinned file; nothing was written."""


class DownloadError(ConnectionError):
    """The file could not be downloaded (network, HTTP status); nothing was written."""


def get(name: str) -> Dataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}: known are {', '.join(sorted(DATASETS))}") from None


def cached_path(name: str) -> Path:
    """Where `dvi data fetch NAME` writes the file."""
    return cache_dir() / "data" / get(name).relative_path


def dataset_path(name: str) -> Path:
    """The file a data set's name resolves to, present or not: the environment variable's path when it is
    set (non-empty), else the cached copy."""
    ds = get(name)
    local = os.environ.get(ds.env)
    return Path(local).expanduser() if local else cached_path(name)


def require(name: str) -> Path:
    """`dataset_path(name)`, or FileNotFoundError saying which command gets the file."""
    ds, path = get(name), dataset_path(name)
    if path.is_file():
        return path
    if os.environ.get(ds.env):
        raise FileNotFoundError(f"{ds.title} not found at {path}, where {ds.env} points: point {ds.env} at a local "
                                f"{Path(ds.relative_path).name}, or unset it and run `dvi data fetch {ds.name}`")
    raise FileNotFoundError(f"{ds.title} not found at {path}: {ds.hint}")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def is_fetched(name: str, sha256: str | None = None) -> bool:
    """Whether the cached copy is there with the expected checksum."""
    path = cached_path(name)
    return path.is_file() and file_sha256(path) == (sha256 or get(name).sha256)


def fetch(name: str, *, url: str | None = None, sha256: str | None = None, force: bool = False,
          progress: bool = True, timeout: float = CONNECT_TIMEOUT_S) -> Path:
    """Download a data set into the cache and return its path. The bytes go to a temporary file next to the
    target and replace it only once their sha256 is the expected one (`sha256`, default the registry's);
    a good cached copy is kept unless `force`. `url` overrides the registry's (a mirror, a file:// URL).
    Raises DownloadError (a ConnectionError) or ChecksumError (a ValueError); either leaves the cache as it was."""
    ds = get(name)
    url, expected = url or ds.url, (sha256 or ds.sha256).lower()
    target = cached_path(name)
    if not force and is_fetched(name, expected):
        return target
    made = [d for d in (target.parent, *target.parent.parents) if not d.exists()]  # deepest first
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            got = _download(ds, url, out, progress, timeout)
        if got != expected:
            raise ChecksumError(f"{ds.name}: the file from {url} has sha256 {got}, expected {expected}; "
                                f"nothing written to {target}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
            for folder in made:  # a failed first fetch leaves no empty folders either
                if any(folder.iterdir()):
                    break
                folder.rmdir()
    return target


def _download(ds: Dataset, url: str, out, progress: bool, timeout: float) -> str:
    """Stream `url` into `out`; returns the bytes' sha256."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    source = "that file" if url == ds.url else ds.url
    by_hand = f"download {source} by hand and set {ds.env} to its path (or save it as {cached_path(ds.name)})"
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "dvi"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else ds.size
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=ds.name,
                      disable=not progress) as bar:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as err:
        raise DownloadError(f"could not download {ds.name} from {url}: HTTP {err.code} {err.reason}; {by_hand}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, ssl.SSLError, http.client.HTTPException,
            ValueError) as err:  # no network, DNS, timeout, refused, cut off, a malformed URL (not a full disk)
        reason = getattr(err, "reason", None) or err
        raise DownloadError(f"could not download {ds.name} from {url}: {reason}; {by_hand}") from None
    return digest.hexdigest()
