"""`dvi data fetch spec-bench` and how `spec-bench` resolves: a local HTTP server stands in for GitHub (no network
in tests); the expected sha256 is the small fake file's, passed in or patched into the registry."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dvi.cli import main
from selfspec import datasets
from selfspec.datasets import ChecksumError, DownloadError, cached_path, dataset_path, fetch
from selfspec.prompts import load_prompts

ROWS = [{"question_id": 1, "category": "translation", "turns": ["Translate to French: good morning."]},
        {"question_id": 2, "category": "math_reasoning", "turns": ["What is 3 * 7?"]},
        {"question_id": 3, "category": "writing", "turns": ["Write a haiku.", "Now a shorter one."]},
        {"question_id": 4, "category": "translation", "turns": ["Translate to German: thank you."]}]
FAKE = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
FAKE_SHA256 = hashlib.sha256(FAKE).hexdigest()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """http://127.0.0.1:PORT serving question.jsonl (the fake) and other.jsonl (different bytes)."""
    root = tmp_path_factory.mktemp("www")
    (root / "question.jsonl").write_bytes(FAKE)
    (root / "other.jsonl").write_bytes(FAKE.replace(b"haiku", b"sonnet"))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty DVI_CACHE_DIR, no DVI_SPEC_BENCH (tests/conftest.py may have set it), and the registry's
    Spec-Bench entry expecting the fake file's sha256."""
    monkeypatch.setenv("DVI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DVI_SPEC_BENCH", raising=False)
    real = datasets.DATASETS["spec-bench"]
    monkeypatch.setitem(datasets.DATASETS, "spec-bench", dataclasses.replace(real, sha256=FAKE_SHA256))
    return tmp_path / "cache"


def leftovers(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def test_the_registry_pins_a_commit_and_a_checksum():
    ds = datasets.DATASETS["spec-bench"]
    assert ds.url == ("https://raw.githubusercontent.com/hemingkx/Spec-Bench/"
                      "fd2c1cd7d2201ef71db4c5f4e455008f017967bf/data/spec_bench/question.jsonl")
    assert len(ds.sha256) == 64 and ds.env == "DVI_SPEC_BENCH"


def test_fetch_lands_in_the_cache_and_spec_bench_reads_it(server, cache, capsys):
    assert main(["data", "fetch", "spec-bench", "--url", f"{server}/question.jsonl"]) == 0
    target = cache / "data/spec_bench/question.jsonl"
    assert target.read_bytes() == FAKE and leftovers(cache) == ["data/spec_bench/question.jsonl"]
    assert "sha256" in capsys.readouterr().out
    prompts = load_prompts("spec-bench")
    assert [p.id for p in prompts] == ["1", "2", "3", "4"] and prompts[2].later_turns == ("Now a shorter one.",)
    assert [p.id for p in load_prompts("spec-bench", 2, offset=1)] == ["2", "3"]
    # a second fetch finds the good copy and downloads nothing (the URL is not even tried)
    assert main(["data", "fetch", "spec-bench", "--url", f"{server}/missing.jsonl"]) == 0
    assert "already in" in capsys.readouterr().out
    assert main(["data", "path", "spec-bench"]) == 0
    assert capsys.readouterr().out.strip() == str(target)


def test_the_fetch_function_takes_the_expected_checksum(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DVI_CACHE_DIR", str(tmp_path / "c"))
    path = fetch("spec-bench", url=f"{server}/question.jsonl", sha256=FAKE_SHA256.upper(), progress=False)
    assert path == tmp_path / "c/data/spec_bench/question.jsonl" and path.read_bytes() == FAKE


def test_a_wrong_checksum_writes_nothing_and_keeps_a_good_copy(server, cache, capsys):
    url = f"{server}/other.jsonl"
    got = hashlib.sha256(FAKE.replace(b"haiku", b"sonnet")).hexdigest()
    with pytest.raises(ChecksumError, match=f"from {url} has sha256 {got}, expected {FAKE_SHA256}"):
        fetch("spec-bench", url=url, progress=False)
    assert leftovers(cache) == [] and not cache.exists()  # not even an empty folder
    # through the CLI: one line, exit 2
    assert main(["data", "fetch", "spec-bench", "--url", url, "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dvi data: error: spec-bench: the file from") and "expected" in lines[0]
    # a good copy survives a forced fetch of bad bytes
    fetch("spec-bench", url=f"{server}/question.jsonl", progress=False)
    assert main(["data", "fetch", "spec-bench", "--url", url, "--force", "--quiet"]) == 2
    assert cached_path("spec-bench").read_bytes() == FAKE and leftovers(cache) == ["data/spec_bench/question.jsonl"]


def test_a_corrupt_cached_copy_is_downloaded_again(server, cache):
    target = cached_path("spec-bench")
    target.parent.mkdir(parents=True)
    target.write_bytes(FAKE[:10])
    assert main(["data", "fetch", "spec-bench", "--url", f"{server}/question.jsonl", "--quiet"]) == 0
    assert target.read_bytes() == FAKE


def test_http_and_network_errors_say_what_failed_and_what_to_do(server, cache, capsys):
    with pytest.raises(DownloadError, match=r"HTTP 404") as err:
        fetch("spec-bench", url=f"{server}/missing.jsonl", progress=False)
    assert "DVI_SPEC_BENCH" in str(err.value) and "by hand" in str(err.value)
    assert isinstance(err.value, ConnectionError) and not cache.exists()
    assert main(["data", "fetch", "spec-bench", "--url", f"{server}/missing.jsonl"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"could not download spec-bench from {server}/missing.jsonl: HTTP 404" in lines[0]
    # nothing listens on a port just closed: connection refused, quickly
    with ThreadingHTTPServer(("127.0.0.1", 0), _Quiet) as closed:
        port = closed.server_address[1]
    with pytest.raises(DownloadError, match=f"could not download spec-bench from http://127.0.0.1:{port}/q.jsonl: .*"
                                            "set DVI_SPEC_BENCH to its path"):
        fetch("spec-bench", url=f"http://127.0.0.1:{port}/q.jsonl", progress=False, timeout=5)
    assert leftovers(cache) == []


def test_without_the_file_the_error_names_the_command(cache, capsys):
    expected = (f"Spec-Bench questions not found at {cache / 'data/spec_bench/question.jsonl'}: run "
                "`dvi data fetch spec-bench` (or set DVI_SPEC_BENCH to a local question.jsonl)")
    with pytest.raises(FileNotFoundError) as err:
        load_prompts("spec-bench")
    assert str(err.value) == expected
    assert main(["bench", "--prompts", "spec-bench", "--n", "1"]) == 2  # fails before any model is loaded
    assert capsys.readouterr().err.strip() == f"dvi bench: error: {expected}"
    assert main(["eval"]) == 2  # --questions defaults to spec-bench
    assert capsys.readouterr().err.strip() == f"dvi eval: error: {expected}"
    assert main(["data", "path", "spec-bench"]) == 1
    assert "`dvi data fetch spec-bench`" in capsys.readouterr().err


def test_the_environment_variable_wins_over_the_cache(server, cache, tmp_path, monkeypatch, capsys):
    fetch("spec-bench", url=f"{server}/question.jsonl", progress=False)
    local = tmp_path / "mine.jsonl"
    local.write_text(json.dumps({"question_id": 9, "category": "qa", "turns": ["Why?"]}) + "\n")
    monkeypatch.setenv("DVI_SPEC_BENCH", str(local))
    assert dataset_path("spec-bench") == local and [p.id for p in load_prompts("spec-bench")] == ["9"]
    monkeypatch.setenv("DVI_SPEC_BENCH", str(tmp_path / "gone.jsonl"))
    with pytest.raises(FileNotFoundError, match="gone.jsonl, where DVI_SPEC_BENCH points: .*unset it and run "
                                                "`dvi data fetch spec-bench`"):
        load_prompts("spec-bench")


def test_trace_sources_default_to_spec_bench(server, cache, tmp_path, capsys):
    """configs/traces/drift_demo.yaml's `{kind: spec_bench}` (no path) and `--source spec-bench` read the fetched file."""
    from actors.traffic import TraceSpec
    from actors.workloads import SpecBenchSource, load_workloads
    from dvi.config import load_config

    fetch("spec-bench", url=f"{server}/question.jsonl", progress=False)
    spec = load_config(TraceSpec, str(Path(__file__).resolve().parents[2] / "configs/traces/drift_demo.yaml"))
    source = next(s for s in spec.sources if s.kind == "spec_bench")
    assert source.path == "spec-bench"
    workloads = load_workloads([source])
    assert {k: [c.source_id for c in v] for k, v in workloads.items()} == {
        "translation": ["spec_bench:1", "spec_bench:4"], "math_reasoning": ["spec_bench:2"]}
    assert SpecBenchSource(kind="spec_bench", path="spec-bench").load() == SpecBenchSource(kind="spec_bench").load()
    out = tmp_path / "t.jsonl"
    assert main(["trace", "make", "--source", "spec-bench", "--n", "3", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3
