"""The generation actor: serves requests with self-speculative decoding and feeds the learner.

`GenerationWorker` holds the logic and runs without Ray (tests, a notebook); `GenerationActor` is the thin Ray
actor around it, created by `start_actor(cfg, ...)` with the config's resources (`num_gpus=1` on a GPU
cluster: one actor per GPU; `num_cpus` and torch threads on CPU) and `max_restarts`.

A request is the trace line's dict (`actors/trace.py`): `messages` (rendered with the tokenizer's chat
template, assistant placeholders filled from this actor's own earlier answers), `prompt` (plain text),
or `prompt_ids` (token ids as they are: pre-tokenised traces, and tests with a tiny model that has no
tokenizer). The result is the dict the dispatcher reads (`actors/dispatch.py`):
{request_id, tokens, t_first_token_s, t_total_s, mean_accepted_length, error} plus the actor's extras
(rounds, drafted, accepted, head_version, ...). A request that cannot run (a prompt longer than the
model's context, malformed messages) comes back with `error` set and the actor serves the next one.

Per request: encode the prompt -> join the batch (selfspec.batching: up to `max_batch` requests decode
together, round by round; every round's Transition goes to the Redis stream through TransitionWriter) ->
flush the stream -> result.

Weights: `weights:latest` is read (one GET) once `weights_check_every_rounds` rounds went by since the
last read, when waiting requests are about to join; a newer blob is fetched, validated (WeightStore) and
swapped in between two rounds. Output never depends on the head (lossless), so the requests in flight go
on with the new one (an attention head rebuilds its own cache from their committed windows). A refused
blob is counted (`weights_refused`) and the actor keeps its head.

Concurrency: the actor accepts up to `max_concurrency` requests at once and decodes up to `max_batch` of
them together; the rest wait in arrival order (its queue depth), and `metrics()` answers while it decodes.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
import zlib
from typing import Generator

import numpy as np
import ray
import redis
import torch

from actors.config import GenerationConfig
from actors.trace import ConversationMemory
from actors.traffic_memory import TrafficMemory
from buffer.served import ServedLog
from buffer.stream import BackpressureTimeout, TransitionWriter
from buffer.weights import WeightsRefused, WeightStore
from selfspec.batching import Batcher
from selfspec.copy_sources import CopySources
from selfspec.drafter import head_from_weights, head_weights
from selfspec.engine import TransitionSink, SelfSpecDecoder
from selfspec.request import DecodeOptions
from selfspec.head_format import HeadSpec
from selfspec.loading import ModelParts, DeviceSettings, cost_batch_sizes, load_model_parts, make_length_policy
from selfspec.prompts import messages_ids
from selfspec.transitions import Transition

STREAM_ERRORS = (redis.RedisError, BackpressureTimeout, OSError)


def load_for_actor(cfg: GenerationConfig, device: str) -> ModelParts:
    """`selfspec.loading.load_model_parts` with the actor's settings, on `device` (one GPU per actor on a cluster)."""
    return load_model_parts(cfg.model, cfg.exit_layer, cfg.head_path, cfg.head, DeviceSettings(device, cfg.dtype, cfg.passes))


class GenerationWorker:
    """One model, one decoder, one stream writer; requests decoded in a batch of up to `cfg.max_batch`.

    `redis_client`: where transitions and weights go (None: no streaming and no weight pulls, e.g. a
    baseline without learning). `parts`: an already built model + head (tests pass a tiny model);
    None loads `cfg.model` on this process's device. The learner publishes weights under the name
    `parts.meta["base_model"]`, else `selfspec.model.model_name(cfg.model)`.
    """

    def __init__(self, cfg: GenerationConfig, run_id: str, actor_id: int = 0, *,
                 redis_client: redis.Redis | None = None, parts: ModelParts | None = None):
        self.cfg, self.run_id, self.actor_id = cfg, run_id, actor_id
        self.writer = TransitionWriter(redis_client, run_id, cfg.stream) if redis_client is not None else None
        self.store: WeightStore | None = None
        self.memory = ConversationMemory()
        # None: the actor's own starting head, not a published one (its transitions carry version 0)
        self.version: int | None = None
        self.latest_published: int | None = None
        self._rounds_since_check = cfg.weights_check_every_rounds  # the first request checks
        self._lock = threading.Lock()  # counts and the stream writer: request threads and the batcher's loop
        self.in_flight = 0
        self.counts = {"requests_done": 0, "requests_failed": 0, "requests_abandoned": 0, "tokens": 0, "rounds": 0, "drafted": 0,
                       "accepted": 0, "transitions_emitted": 0, "stream_errors": 0, "weights_swaps": 0,
                       "weights_refused": 0, "weights_errors": 0}
        self.last_weights_problem: str | None = None
        self.last_stream_problem: str | None = None
        # the model is loaded on the batcher's loop thread, the one that decodes (why: selfspec.batching)
        self.traffic: TrafficMemory | None = None  # what the decoder copies drafts from besides each request's text
        self.batcher = Batcher(lambda: self._build_decoder(parts, redis_client), cfg.max_batch,
                               between_rounds=self._between_rounds)
        self.decoder = self.batcher.decoder

    def _build_decoder(self, parts: ModelParts | None, redis_client: redis.Redis | None) -> SelfSpecDecoder:
        """The model (`parts`, else cfg.model loaded on this process's device), its cost-measured length
        policy and the decoder; the weight store that checks published heads against this one."""
        cfg = self.cfg
        threads = cfg.num_threads or (max(1, int(cfg.num_cpus)) if cfg.num_gpus == 0 else None)
        if threads:
            torch.set_num_threads(threads)
        if parts is None:
            device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
            parts = load_for_actor(cfg, device)
        self.parts, self.tokenizer = parts, parts.tokenizer
        self.split, self.head = parts.split, parts.head
        policy = make_length_policy(cfg.length_policy, cfg.gamma, parts.passes, self.head, cost_batch_sizes(cfg.max_batch))
        if redis_client is not None:
            from selfspec.model import model_name

            base_model = parts.meta.get("base_model") or model_name(cfg.model)
            # the one fit rule: a version must have this head's arrays, exit layer and base model
            spec = HeadSpec.of(*head_weights(self.head), base_model=base_model)
            self.store = WeightStore(redis_client, self.run_id, expected=spec)
        sink = TransitionSink(self._sink, self.run_id, self.actor_id, cfg.topk, cfg.prompt_rows) if self.writer else None
        if cfg.memory != "off":
            shared = cfg.memory == "shared" and redis_client is not None
            log = ServedLog(redis_client, self.run_id, f"{self.actor_id}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
                            cfg.memory_bounds.stream_maxlen) if shared else None
            self.traffic = TrafficMemory(cfg.memory_bounds, log)
            self.traffic.catch_up()
        copies = CopySources(cfg.ngram, self.traffic.index if self.traffic is not None else None)
        return SelfSpecDecoder(self.split, self.head, policy, copies, sink=sink, passes=parts.passes)

    # -- serving ----------------------------------------------------------------------------------

    def generate(self, request: dict) -> dict:
        """Serve one request to its end; its result dict (thread-safe, see `stream`)."""
        *_, result = self.stream(request)
        return result

    def stream(self, request: dict) -> Generator[list[int] | dict, bool | None, None]:
        """Serve one request: yield its new token ids as each round settles them, then its result dict.
        `send(True)` after a chunk ends the request there (a stop sequence matched); closing the generator
        abandons it after the current round (a client that left). Thread-safe: concurrent callers share the
        batch (up to max_batch), the others wait their turn in call order."""
        with self._lock:
            self.in_flight += 1
        try:
            yield (yield from self._serve(request))
        finally:
            with self._lock:
                self.in_flight -= 1

    def _serve(self, request: dict) -> Generator[list[int], bool | None, dict]:
        start = time.perf_counter()
        request_id = str(request.get("request_id", "")) if isinstance(request, dict) else ""
        result = {"request_id": request_id, "tokens": 0, "t_first_token_s": 0.0, "t_total_s": 0.0,
                  "mean_accepted_length": None, "error": None, "actor_id": self.actor_id, "pid": os.getpid()}
        handle = None
        try:
            if not isinstance(request, dict) or not request_id:
                raise ValueError("a request is a dict with a request_id")
            prompt_ids = self._prompt_ids(request)
            seed = request.get("seed")
            t_prep = time.perf_counter() - start
            handle = self.batcher.submit(prompt_ids, DecodeOptions(
                max_new_tokens=int(request.get("max_new_tokens", 128)),
                temperature=float(request.get("temperature", 0.0)), request_id=request_id,
                # unseeded requests are seeded by their id: a replayed trace samples the same tokens
                seed=int(seed) if seed is not None else zlib.crc32(request_id.encode()),
                workload=str(request.get("workload", ""))))
            for chunk in handle:
                if (yield chunk):  # True: a stop sequence matched, the request ends there
                    handle.stop()
                    break
            out = handle.wait()
            self._flush()
            if self.traffic is not None and out.tokens:
                self.traffic.served(prompt_ids, out.tokens)
            if self.tokenizer is not None and request.get("messages") is not None:
                self.memory.remember(request, self.tokenizer.decode(out.tokens, skip_special_tokens=True))
        except GeneratorExit:  # the caller left: what was decoded still reached the stream
            if handle is not None:
                handle.cancel()
            self._flush()
            self._count(requests_abandoned=1)
            raise
        except Exception as err:  # a bad request, reported in its result; the actor serves the next one
            self._flush()
            self._count(requests_failed=1)
            lines = str(err).strip().splitlines()
            result.update(error=f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": "),
                          t_total_s=time.perf_counter() - start, head_version=self.version)
            return result
        drafted = sum(r.drafted for r in out.rounds)
        accepted = sum(r.accepted for r in out.rounds)
        per_pos = [0] * self.decoder.length_policy.max_drafts
        for r in out.rounds:
            for position in range(r.accepted):
                per_pos[position] += 1
        self._count(requests_done=1, tokens=len(out.tokens), rounds=len(out.rounds), drafted=drafted, accepted=accepted)
        with self._lock:
            self._rounds_since_check += len(out.rounds)
        # its own times, from when it joined the batch (the dispatcher adds the queue from its latency)
        result.update(tokens=len(out.tokens), t_first_token_s=t_prep + out.t_prefill, t_total_s=t_prep + out.t_total,
                      mean_accepted_length=out.mean_accepted_length, rounds=len(out.rounds), drafted=drafted,
                      accepted=accepted, draft_rounds=sum(r.drafted > 0 for r in out.rounds),
                      drafted_by_kind=_by_kind(out.rounds, "drafted"), accepted_by_kind=_by_kind(out.rounds, "accepted"),
                      accepted_per_pos=per_pos, stop_reason=out.stop_reason, prompt_tokens=len(prompt_ids),
                      head_version=self.version, output_ids=list(out.tokens),
                      mean_batch_size=sum(r.batch for r in out.rounds) / len(out.rounds) if out.rounds else None)
        return result

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for key, value in deltas.items():
                self.counts[key] += value

    def _prompt_ids(self, request: dict) -> list[int]:
        """Token ids of the request: `prompt_ids` as given, `messages` through the chat template (earlier
        answers filled in), or `prompt` as plain text."""
        given = [key for key in ("prompt_ids", "messages", "prompt") if request.get(key) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt_ids, messages or prompt, got {given or 'none'}")
        if given[0] == "prompt_ids":
            ids = request["prompt_ids"]
            if not isinstance(ids, (list, tuple)) or any(type(i) is not int for i in ids):
                raise ValueError("prompt_ids must be a list of token ids")
            vocab = self.split.config.vocab_size
            if any(not 0 <= i < vocab for i in ids):
                raise ValueError(f"prompt_ids must be in [0, {vocab})")
            return list(ids)
        if self.tokenizer is None:
            raise ValueError("this actor has no tokenizer: send prompt_ids")
        if given[0] == "prompt":
            if not isinstance(request["prompt"], str):
                raise ValueError("prompt must be a string")
            return list(self.tokenizer(request["prompt"])["input_ids"])
        messages = self.memory.messages_for(request)
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f"malformed message {m!r}: expected {{role: system|user|assistant, content: str}}")
        return messages_ids(self.tokenizer, messages)

    # -- streaming --------------------------------------------------------------------------------

    def _sink(self, t: Transition) -> None:
        with self._lock:
            self.counts["transitions_emitted"] += 1
            try:
                self.writer.write(t)
            except STREAM_ERRORS as err:
                # Serving goes on without Redis: the writer keeps the batch and the next flush retries it.
                self._stream_failed(err)

    def _flush(self) -> None:
        if self.writer is None:
            return
        with self._lock:
            try:
                self.writer.flush()
            except STREAM_ERRORS as err:
                self._stream_failed(err)

    def _stream_failed(self, err: Exception) -> None:
        self.counts["stream_errors"] += 1
        self.last_stream_problem = f"{type(err).__name__}: {err}"

    # -- weights ----------------------------------------------------------------------------------

    def _between_rounds(self) -> None:
        """On the batch loop, before waiting requests join: what was served goes into the traffic memory, and
        a newer head may come in."""
        if self.traffic is not None:
            self.traffic.refresh()
        self._maybe_swap_head()

    def _maybe_swap_head(self) -> None:
        """Between rounds, before requests join: once enough rounds went by, read weights:latest and swap a
        newer head in."""
        if self.store is None or self._rounds_since_check < self.cfg.weights_check_every_rounds:
            return
        self._rounds_since_check = 0
        try:
            self.latest_published = self.store.latest_version()
            if self.latest_published is None or (self.version is not None and self.latest_published <= self.version):
                return
            pulled = self.store.pull_if_newer(self.version)
            if pulled is None:
                return  # the latest is a version refused before: not fetched (nor counted) again
            version, arrays, meta = pulled
            self._swap(version, arrays, meta)
        except WeightsRefused as err:
            self.counts["weights_refused"] += 1
            self.last_weights_problem = str(err)
        except redis.RedisError as err:  # Redis away: keep serving with the current head, try again later
            self.counts["weights_errors"] += 1
            self.last_weights_problem = f"{type(err).__name__}: {err}"

    def _swap(self, version: int, arrays: dict[str, np.ndarray], meta: dict) -> None:
        vocab = arrays.get("vocab_ids")
        same_vocab = (vocab is None) == (self.head.vocab_ids is None) and (
            vocab is None or np.array_equal(vocab, self.head.vocab_ids.cpu().numpy()))
        same_config = meta.get("head", self.head.config.model_dump()) == self.head.config.model_dump()
        if same_vocab and same_config:  # the usual case: new values for the same parameters (the store checked them)
            self.head.load_trainable_state({k: np.array(v) for k, v in arrays.items() if k != "vocab_ids"})
        else:  # another draft vocabulary or head config: build the learner's head
            try:
                self.head = head_from_weights(self.split, arrays, meta)
            except (ValueError, TypeError, KeyError) as err:  # weights at odds with their config, a bad config
                raise WeightsRefused(version, str(err)) from None
        self.decoder.set_head(self.head, version)
        self.version = version
        self.counts["weights_swaps"] += 1

    # -- reporting --------------------------------------------------------------------------------

    def metrics(self) -> dict:
        c = self.counts
        rounds = max(c["rounds"], 1)
        lag = None
        if self.latest_published is not None:
            lag = self.latest_published - (self.version if self.version is not None else -1)
        writer = self.writer.counts if self.writer is not None else {}
        busy = self.batcher.busy_s  # seconds with requests in the batch: what the actor's tokens/s divides by
        return {"actor_id": self.actor_id, "pid": os.getpid(), **c, "decode_s": busy,
                "tokens_per_s": c["tokens"] / busy if busy > 0 else None,
                "batch_size": self.batcher.batch_size, "batch_rounds": self.batcher.rounds,
                "mean_batch_size": self.batcher.mean_batch_size,
                "mean_accepted_length": (c["accepted"] / c["rounds"] + 1) if c["rounds"] else None,
                "drafted_per_round": c["drafted"] / rounds, "accepted_per_round": c["accepted"] / rounds,
                "head_version": self.version, "latest_published": self.latest_published, "head_lag": lag,
                "transitions_written": writer.get("written", 0), "transitions_dropped": writer.get("dropped_oldest", 0),
                "in_flight": self.in_flight, "queue_depth": len(self.batcher.waiting), "last_weights_problem": self.last_weights_problem,
                "last_stream_problem": self.last_stream_problem,
                **(self.traffic.metrics() if self.traffic is not None else {})}

    def close(self) -> None:
        """Stop the batch loop (requests still in it fail) and send what the stream still buffers."""
        self.batcher.close()
        self._flush()


def _by_kind(rounds, field: str) -> dict[str, int]:
    """A request's drafted (or accepted) tokens per source: copied, remembered, drafted (the head)."""
    out: dict[str, int] = {}
    for r in rounds:
        if r.drafted:
            out[r.kind] = out.get(r.kind, 0) + getattr(r, field)
    return out


class GenerationActor:
    """The Ray face of a GenerationWorker. `metrics`/`close` run in their own concurrency group, so they answer
    while a request decodes."""

    def __init__(self, cfg: GenerationConfig, run_id: str, actor_id: int = 0, *, redis_url: str | None = None,
                 redis_password: str | None = None, parts: ModelParts | None = None):
        from buffer.connection import connect

        client = connect(redis_url, redis_password) if redis_url else None
        self.generator = GenerationWorker(cfg, run_id, actor_id, redis_client=client, parts=parts)

    def generate(self, request: dict) -> dict:
        return self.generator.generate(request)

    @ray.method(concurrency_group="control")
    def metrics(self) -> dict:
        return self.generator.metrics()

    @ray.method(concurrency_group="control")
    def close(self) -> None:
        self.generator.close()

    def __ray_shutdown__(self) -> None:  # Ray calls this when the actor is terminated gracefully
        self.generator.close()


def start_actor(cfg: GenerationConfig, run_id: str, actor_id: int = 0, **kwargs):
    """A GenerationActor with the config's resources and restart policy (call after ray.init). Requests
    in flight when the actor dies are sent again to its restarted self (`max_task_retries`): decoding
    a request twice is harmless, losing one is not."""
    actor_class = ray.remote(concurrency_groups={"control": 1})(GenerationActor)
    return actor_class.options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_restarts=cfg.max_restarts,
                               max_task_retries=cfg.max_restarts,
                               max_concurrency=cfg.max_concurrency).remote(cfg, run_id, actor_id, **kwargs)
