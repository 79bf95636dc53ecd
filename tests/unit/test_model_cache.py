"""The built-in model's conversion into the cache is safe under concurrency: one process converts while
the others wait, a loader never sees a half-written directory, and what a killed conversion left is
cleaned up. These drive selfspec.model._install_atomically with a cheap writer; tests/e2e/test_model_conversion.py
starts three processes on the real SmolLM2 from an empty cache."""
import threading
import time

import pytest

from selfspec.model import COMPLETE_MARKER, _install_atomically, _is_complete


def write_model(out):
    """Stands in for the conversion: the files a loader needs, plus one to tell which writer ran."""
    for name in ("model.safetensors", "config.json", "tokenizer_config.json", "tokenizer.json"):
        (out / name).write_text(name)


def test_writes_once_then_finds_it_complete(tmp_path):
    target = tmp_path / "models" / "m"
    calls = []
    for _ in range(2):
        _install_atomically(target, lambda out: (calls.append(out), write_model(out)))
    assert len(calls) == 1 and calls[0].name.startswith("m.tmp-") and not calls[0].exists()
    assert (target / COMPLETE_MARKER).is_file() and (target / "config.json").read_text() == "config.json"
    assert sorted(p.name for p in target.parent.iterdir()) == ["m", "m.lock"]


def test_stale_temporaries_and_incomplete_target_are_replaced(tmp_path):
    target = tmp_path / "m"
    for stale in ("m.tmp", "m.tmp-xyz"):  # the old fixed name and a killed holder's mkdtemp
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "model.safetensors").write_text("half")
    target.mkdir()  # a killed conversion's target: weights but no config, tokenizer or marker
    (target / "model.safetensors").write_text("half")
    (tmp_path / "m2.tmp-other").mkdir()  # another target's temporary: not ours to remove
    _install_atomically(target, write_model)
    assert (target / "model.safetensors").read_text() == "model.safetensors" and _is_complete(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.lock", "m2.tmp-other"]


def test_complete_directory_without_marker_is_kept(tmp_path):
    """One the code before the marker converted: weights, config and tokenizer are there."""
    target = tmp_path / "m"
    target.mkdir()
    write_model(target)
    _install_atomically(target, lambda out: pytest.fail("reconverted a complete directory"))
    assert not (target / COMPLETE_MARKER).exists()


def test_failed_writer_leaves_nothing_behind(tmp_path):
    target = tmp_path / "m"

    def fail(out):
        (out / "model.safetensors").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        _install_atomically(target, fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.lock"]
    _install_atomically(target, write_model)
    assert _is_complete(target)


def test_concurrent_callers_run_the_writer_once(tmp_path, capsys):
    target = tmp_path / "m"
    calls, seen = [], []

    def slow_writer(out):
        calls.append(out)
        time.sleep(0.5)  # long enough that the other callers find the lock held
        write_model(out)

    def load():
        _install_atomically(target, slow_writer)
        seen.append(_is_complete(target))  # what a loader would open right after

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and seen == [True] * 3
    assert capsys.readouterr().out.count("[dvi] waiting for another process converting") == 2
