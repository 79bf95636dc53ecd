"""The Batcher (selfspec.batching): requests submitted from any thread stream their chunks and end as plain
greedy decoding; it stops, cancels, rejects and closes request by request; it builds its decoder on its own
thread, or runs on its caller's."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from batch_cases import make_decoder, model_fixture, reference_fixture  # noqa: F401 - fixtures
from tiny_model import MAX_POS, plain_greedy, plain_greedy_batch

from selfspec.batching import Batcher
from selfspec.copy_sources import CopySources


def finish(handle, timeout: float = 60.0):
    """(the handle's chunks, its DecodeResult or the exception wait() raised), or a failure if it hangs."""
    out = {}

    def read():
        out["chunks"] = list(handle)
        try:
            out["result"] = handle.wait()
        except Exception as err:  # noqa: BLE001 - the test looks at it
            out["result"] = err
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        pytest.fail(f"a request hung: {handle.prompt_ids[:8]}... {handle.options}")
    return out["chunks"], out["result"]


@pytest.mark.parametrize("policy,ngram", [("fixed", 0), ("cost_aware", 1)])
def test_batcher_rows_are_plain_greedy(model, reference, policy, ngram):
    """Requests submitted to a Batcher (at most 3 at once) stream their chunks and end as plain greedy
    decoding; between_rounds runs on the loop thread."""
    calls = []
    batcher = Batcher(make_decoder(model, 2, 4, policy, 0.05, copies=CopySources(ngram=ngram)), max_batch=3,
                      between_rounds=lambda: calls.append(threading.current_thread().name))
    try:
        handles = [batcher.submit(p, **o) for p, o, _ in reference]
        for handle, (prompt, options, expected) in zip(handles, reference, strict=True):
            chunks, result = finish(handle)
            assert sum(chunks, []) == result.tokens == expected, f"prompt={prompt} {options}"
        assert 1 < batcher.mean_batch_size <= 3
        assert calls and set(calls) == {"dvi-batcher"}
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit([1, 2])


def test_stop_ends_a_request_where_its_reader_stopped(model, reference):
    """stop() after the first chunk (the prefill's token) or the third: the result holds what was read, with
    stop_reason "stop"; the request beside it (in the next slot: it moves into the stopped one's) decodes on,
    and the batch empties."""
    long_prompt, other_prompt = reference[0][0], reference[2][0]
    full, other_run = plain_greedy_batch(model, [long_prompt, other_prompt], [60, 40])
    batcher = Batcher(make_decoder(model, 2, 4, "fixed", 0.05), max_batch=3)
    try:
        for after in (1, 3):
            stopped = batcher.submit(long_prompt, max_new_tokens=60, eos_ids=set())
            other = batcher.submit(other_prompt, max_new_tokens=40, eos_ids=set())
            read = []
            for n, chunk in enumerate(stopped, 1):
                read += chunk
                if n == after:
                    stopped.stop()
            chunks, result = finish(stopped)
            assert not isinstance(result, Exception), result
            assert result.stop_reason == "stop" and result.tokens == read == full[:len(read)]
            assert len(read) < 60 and (after == 1) == (len(read) == 1)
            chunks, result = finish(other)
            assert not isinstance(result, Exception), result
            assert sum(chunks, []) == result.tokens == other_run
        for _ in range(100):
            if batcher.batch_size == 0:
                break
            time.sleep(0.05)
        assert batcher.batch_size == 0
    finally:
        batcher.close()


def test_cancel_frees_the_slot(model, reference):
    """cancel() abandons a running request (it leaves before it would have ended; the request in the slot
    after it moves into its slot and decodes on) and a waiting one (never decoded): the requests after them
    take the freed slots and decode correctly."""
    companion_prompt = reference[1][0]
    (companion_run,) = plain_greedy_batch(model, [companion_prompt], 50)
    batcher = Batcher(make_decoder(model, 2, 4, "fixed", 0.05, copies=CopySources(ngram=1)), max_batch=2)
    try:
        running = batcher.submit(reference[0][0], max_new_tokens=60, eos_ids=set())
        companion = batcher.submit(companion_prompt, max_new_tokens=50, eos_ids=set())
        waiting = batcher.submit(reference[5][0], max_new_tokens=60, eos_ids=set())
        after = [batcher.submit(p, **o) for p, o, _ in reference[4:7]]
        waiting.cancel()
        next(iter(running))
        running.cancel()
        abandoned = finish(running)[1]
        assert not isinstance(abandoned, Exception), abandoned
        assert abandoned.stop_reason == "length" and 1 <= len(abandoned.tokens) < 60
        assert finish(waiting) == ([], None)
        for handle, expected in zip([companion, *after], [companion_run, *(c[2] for c in reference[4:7])], strict=True):
            result = finish(handle)[1]
            assert not isinstance(result, Exception), result
            assert result.tokens == expected
    finally:
        batcher.close()


def test_bad_request_fails_alone(model, reference):
    """Requests that cannot run fail alone with the decoder's ValueError; the others decode."""
    batcher = Batcher(make_decoder(model, 2, 4, "fixed", 0.05), max_batch=2)
    bad = {"empty prompt": ([], {}), "prompt has 96 tokens": (list(range(MAX_POS)), {}),
           "temperature must be >= 0": ([1, 2], {"temperature": -1.0}),
           "max_new_tokens must be >= 1": ([1, 2], {"max_new_tokens": 0})}
    try:
        good = [batcher.submit(p, **o) for p, o, _ in reference[:2]]
        failing = {message: batcher.submit(p, **o) for message, (p, o) in bad.items()}
        good += [batcher.submit(p, **o) for p, o, _ in reference[2:4]]
        for message, handle in failing.items():
            chunks, err = finish(handle)
            assert chunks == [] and isinstance(err, ValueError) and str(err).startswith(message)
        for handle, (_, _, expected) in zip(good, reference[:4], strict=True):
            assert finish(handle)[1].tokens == expected
    finally:
        batcher.close()


def test_request_with_an_unknown_token_fails_alone(model, reference):
    """A prompt with a token id outside the vocabulary cannot run: it fails (its wait() raises, it does not
    hang), and the request decoding beside it is not failed with it."""
    batcher = Batcher(make_decoder(model, 2, 4, "fixed", 0.05), max_batch=2)
    try:
        prompt, options, expected = reference[0]
        good = batcher.submit(prompt, **{**options, "max_new_tokens": 40, "eos_ids": set()})
        next(iter(good))  # decoding when the bad one joins
        bad = batcher.submit([1, model.config.vocab_size + 7], max_new_tokens=5)
        err = finish(bad, 5)[1]
        assert isinstance(err, Exception)
        result = finish(good, 20)[1]
        assert not isinstance(result, Exception), f"the good request failed with the bad one: {result!r}"
        assert result.tokens == plain_greedy(model, prompt, 40)
    finally:
        batcher.close()


def test_close_fails_what_is_in_flight_or_waiting(model):
    """close() while requests run and wait: each of them fails with an error (none hangs), and no request is
    accepted after. The loop is held in between_rounds while close() is called, so the order is certain."""
    entered, release = threading.Event(), threading.Event()
    admits = []

    def between_rounds():
        admits.append(1)
        if len(admits) == 2:  # the second admission: a request is running, another about to join
            entered.set()
            release.wait(30)
    batcher = Batcher(make_decoder(model, 2, 4, "fixed", 0.05), max_batch=2, between_rounds=between_rounds)
    running = batcher.submit([1, 2, 3], max_new_tokens=80, eos_ids=set())
    next(iter(running))  # it runs
    joining = batcher.submit([4, 5, 6], max_new_tokens=80, eos_ids=set())
    assert entered.wait(30)
    waiting = [batcher.submit([7, 8, 9], max_new_tokens=80, eos_ids=set()) for _ in range(3)]
    closer = threading.Thread(target=batcher.close, daemon=True)
    closer.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # once submit refuses, close() has marked the batcher closed
        try:
            waiting.append(batcher.submit([7, 8, 9], max_new_tokens=80, eos_ids=set()))
        except RuntimeError:
            break
        time.sleep(0.01)
    release.set()
    closer.join(10)
    assert not closer.is_alive(), "close() hung"
    for handle in [running, joining, *waiting]:
        err = finish(handle, 10)[1]
        assert isinstance(err, RuntimeError) and "closed" in str(err)


def test_the_loop_builds_its_decoder_on_its_own_thread(model, reference):
    """A function as the decoder runs on the loop's thread (where the model then decodes, alone in its
    process: see selfspec.batching) before the constructor returns; what it raises, the constructor raises."""
    built_on = []

    def build():
        built_on.append(threading.current_thread().name)
        return make_decoder(model, 2, 4, "fixed", 0.05)
    batcher = Batcher(build, max_batch=2)
    try:
        assert built_on == ["dvi-batcher"] and batcher.decoder is not None
        prompt, options, expected = reference[0]
        assert finish(batcher.submit(prompt, **options))[1].tokens == expected
    finally:
        batcher.close()

    def broken():
        raise FileNotFoundError("no such model")
    with pytest.raises(FileNotFoundError, match="no such model"):
        Batcher(broken, max_batch=2)
    with pytest.raises(ValueError, match="own thread"):
        Batcher(build, max_batch=2, own_thread=False)


def test_the_loop_runs_on_its_callers_thread(model, reference):
    """own_thread=False: run() serves on the calling thread until close() from another one; the requests
    decode as plain greedy, and the caller's grad mode is as it was."""
    decoder = make_decoder(model, 2, 4, "fixed", 0.05)
    assert decoder.step() == []  # nothing in the batch: a round of nothing
    batcher = Batcher(decoder, max_batch=3, own_thread=False)
    results = []

    def clients():
        try:
            handles = [batcher.submit(p, **o) for p, o, _ in reference[:5]]
            results.extend(finish(h)[1] for h in handles)
        finally:
            batcher.close()
    sender = threading.Thread(target=clients)
    sender.start()
    batcher.run()
    sender.join(30)
    assert [r.tokens for r in results] == [c[2] for c in reference[:5]]
    assert torch.is_grad_enabled()
