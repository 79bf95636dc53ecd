"""Continuous batching: many requests on one decoder, round by round.

Up to `max_batch` requests decode together; the others wait in arrival order. Between rounds, waiting
requests join (their prompts prefill together, those of similar length in one pass) and requests that
ended leave, so a short request never waits for a long one (vLLM's and SGLang's schedulers work the same way, in tokens rather
than requests). One thread, the loop, owns the decoder; callers on any thread `submit` a request and
iterate its `Handle` for token chunks as rounds settle them.

The loop's thread should be the only one in its process that runs the model. PyTorch's OpenMP (libgomp)
gives every thread that runs a parallel region a team of its own, and once the teams hold more threads
than the machine has cores, libgomp stops spinning between regions and every small op pays a wake-up:
decoding ran up to 45% slower on 2 cores when the model had been loaded, or a baseline run, on another thread.
So the loop builds its decoder itself when given a function that does (an actor, a replica), or runs on
the caller's thread (`own_thread=False`, then `run()`: a benchmark whose main thread ran the model already).

What to draft for each sequence is the length policy's decision, made per round for the batch size of that
round (selfspec.length_policy.CostAware).
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import replace
from typing import Callable, Iterator

import torch

from selfspec.engine import SelfSpecDecoder, Sequence
from selfspec.request import DecodeOptions, DecodeResult

_END = object()


class Handle:
    """One submitted request: iterate it for its token chunks (the prefill's first token, then each
    round's); `wait()` then gives its DecodeResult, or raises what made it fail. `stop()` ends it after the
    chunks read so far (a stop sequence matched: stop_reason "stop"); `cancel()` abandons it."""

    def __init__(self, prompt_ids, options: DecodeOptions):
        self.prompt_ids, self.options = prompt_ids, options
        self.submitted = time.perf_counter()
        self.delivered = 0  # tokens the caller has read
        self.stopped = self.cancelled = False
        self._chunks: queue.Queue = queue.Queue()
        self._result: DecodeResult | None = None
        self._error: BaseException | None = None

    def __iter__(self) -> Iterator[list[int]]:
        while not (self.stopped or self.cancelled):
            chunk = self._chunks.get()
            if chunk is _END:
                self._chunks.put(_END)  # for wait()
                return
            self.delivered += len(chunk)
            yield chunk

    def stop(self) -> None:
        self.stopped = True

    def cancel(self) -> None:
        self.cancelled = True

    def wait(self) -> DecodeResult:
        while self._chunks.get() is not _END:
            pass
        self._chunks.put(_END)
        if self._error is not None:
            raise self._error
        if self.stopped and self._result is not None:  # what the caller read is what it got
            del self._result.tokens[self.delivered:]
            self._result.stop_reason = "stop"
        return self._result

    # the loop's side
    def _put(self, tokens: list[int]) -> None:
        self._chunks.put(tokens)

    def _finish(self, result: DecodeResult | None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._chunks.put(_END)


class Batcher:
    """Serves submitted requests on a decoder, up to `max_batch` at once. `decoder`: the decoder, or a
    function that builds it, called on the loop's thread (the constructor waits for it and raises what it
    raised). `between_rounds` runs on the loop thread before waiting requests join (an actor pulls new head
    weights there). `own_thread=False`: the loop runs in `run()`, on its caller's thread, until `close()`."""

    def __init__(self, decoder: SelfSpecDecoder | Callable[[], SelfSpecDecoder], max_batch: int,
                 between_rounds: Callable[[], None] | None = None, *, own_thread: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        build = None if isinstance(decoder, SelfSpecDecoder) else decoder
        if build is not None and not own_thread:
            raise ValueError("a Batcher builds its decoder only on its own thread: pass the decoder")
        self.decoder, self.max_batch, self.between_rounds = None if build else decoder, max_batch, between_rounds
        self.waiting: deque[Handle] = deque()
        self.running: dict[int, tuple[Sequence, Handle]] = {}  # by id(sequence)
        self.rounds = self.sequence_rounds = 0  # rounds run, and sequences in them summed (mean batch size)
        self.busy_s = 0.0  # seconds with at least one request in the batch
        self._wake = threading.Condition()
        self._closed = False
        self._thread = None
        if own_thread:
            built: queue.Queue = queue.Queue()
            self._thread = threading.Thread(target=self._build_and_run, args=(build, built), name="dvi-batcher",
                                            daemon=True)
            self._thread.start()
            error = built.get()
            if error is not None:
                raise error

    def submit(self, prompt_ids, options: DecodeOptions | None = None, **overrides) -> Handle:
        """Queue a request (thread-safe); it joins the batch at the next round with room."""
        handle = Handle(prompt_ids, replace(options or DecodeOptions(), **overrides))
        with self._wake:
            if self._closed:
                raise RuntimeError("this batcher is closed")
            self.waiting.append(handle)
            self._wake.notify()
        return handle

    @property
    def batch_size(self) -> int:
        return len(self.decoder.batch)

    @property
    def mean_batch_size(self) -> float | None:
        return self.sequence_rounds / self.rounds if self.rounds else None

    def close(self) -> None:
        """Stop the loop after the round in flight; requests still in it or waiting fail."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _build_and_run(self, build: Callable[[], SelfSpecDecoder] | None, built: queue.Queue) -> None:
        if build is not None:
            try:
                self.decoder = build()
            except BaseException as err:  # the constructor raises it
                built.put(err)
                return
        built.put(None)
        self.run()

    @torch.no_grad()
    def run(self) -> None:
        """The loop: admit waiting requests, run a round, until `close()`; then fail what is left."""
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closed or self.waiting or self.running)
                if self._closed:
                    break
            started = time.perf_counter()
            try:
                self._admit()
                self._drop_ended()
                if self.decoder.batch:
                    self._round()
            except Exception as err:  # a decoder failure fails the batch in flight; the loop serves on
                self._fail_all(err)
            self.busy_s += time.perf_counter() - started
        self._fail_all(RuntimeError("the batcher closed"))
        with self._wake:
            waiting, self.waiting = list(self.waiting), deque()
        for handle in waiting:
            handle._finish(None, RuntimeError("the batcher closed"))

    def _admit(self) -> None:
        """Waiting requests join while the batch has room, their prefills batched; one that cannot run fails
        alone."""
        if not self.waiting or len(self.decoder.batch) >= self.max_batch:
            return
        if self.between_rounds is not None:
            self.between_rounds()
        joining = []
        with self._wake:
            while self.waiting and len(self.decoder.batch) + len(joining) < self.max_batch:
                handle = self.waiting.popleft()
                if handle.cancelled:
                    handle._finish(None, None)
                    continue
                try:
                    self.decoder.check(handle.prompt_ids, handle.options)
                except Exception as err:  # this request's alone (a bad one): the batch goes on
                    handle._finish(None, err)
                    continue
                joining.append(handle)
        if not joining:
            return
        try:
            seqs = self.decoder.join_all([(handle.prompt_ids, handle.options) for handle in joining])
        except Exception as err:  # the joining requests fail; the batch in flight goes on
            for handle in joining:
                handle._finish(None, err)
            return
        for seq, handle in zip(seqs, joining):
            handle._put(list(seq.result.tokens))
            if seq.finished:
                handle._finish(seq.result)
            else:
                self.running[id(seq)] = (seq, handle)

    def _drop_ended(self) -> None:
        """Requests their callers stopped or abandoned leave before the next round."""
        for key, (seq, handle) in list(self.running.items()):
            if handle.stopped or handle.cancelled:
                self.decoder.leave(seq, "stop" if handle.stopped else None)
                del self.running[key]
                handle._finish(seq.result)

    def _round(self) -> None:
        stepped = self.decoder.step()
        self.rounds += 1
        self.sequence_rounds += len(stepped)
        for seq, new in stepped:
            _, handle = self.running[id(seq)]
            handle._put(new)
            if seq.finished:
                del self.running[id(seq)]
                handle._finish(seq.result)

    def _fail_all(self, err: BaseException) -> None:
        for seq, handle in self.running.values():
            self.decoder.leave(seq)
            handle._finish(None, err)
        self.running.clear()
