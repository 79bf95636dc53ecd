"""A generation replica: the Ray Serve face of `actors.generation.GenerationWorker`, the same decoder,
transition stream and weight pulls as a `dvi run` actor, decoding up to `actors.max_batch` requests together
(continuous batching, selfspec.batching); Serve's `max_ongoing_requests` bounds what it holds, the rest of
them waiting for room in the batch, and `max_queued_requests` the callers waiting beyond it.

`generate` streams text as it settles: each request is read on a thread of the replica's own pool (the
batch loop decodes on its own thread; the replica's event loop stays free for new calls and cancellations),
its tokens through a TextStream that holds back a possible stop sequence. A cancelled call (the client left) stops decoding after the round in
progress, so the replica is free for the next request.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from actors.config import GenerationConfig
from actors.generation import GenerationWorker
from dvi.serve.text import TextStream

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


@serve.deployment
class GenerationReplica:
    def __init__(self, cfg_json: str, run_id: str, redis_url: str | None, redis_password: str | None):
        from buffer.connection import connect

        cfg = GenerationConfig.model_validate_json(cfg_json)
        rank = serve.get_replica_context().rank
        actor_id = int(getattr(rank, "rank", rank) or 0)
        client = connect(redis_url, password=redis_password) if redis_url else None
        self.worker = GenerationWorker(cfg, run_id, actor_id, redis_client=client)
        # a thread per request it holds (asyncio's default pool has only a few: they would cap the batch)
        self.readers = ThreadPoolExecutor(cfg.max_concurrency, thread_name_prefix="dvi-request")

    async def generate(self, request: dict):
        """Yield {"text"} chunks as they settle, then {"text", "result"}: the worker's result dict with
        `finish_reason` and the replica's counters (`replica_metrics`, GenerationWorker.metrics)."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        stops = list(request.pop("stop", None) or [])

        def decode():
            text = TextStream(self.worker.tokenizer, stops)
            steps = self.worker.stream(request)
            try:
                item = next(steps)
                while not isinstance(item, dict):
                    if cancelled.is_set():
                        steps.close()
                        return
                    new = text.add(item)
                    if new:
                        loop.call_soon_threadsafe(chunks.put_nowait, {"text": new})
                    item = steps.send(text.stopped)
                item.update(finish_reason=FINISH.get(item.get("stop_reason"), "stop"),
                            replica_metrics=self.worker.metrics())
                loop.call_soon_threadsafe(chunks.put_nowait, {"text": text.finish(), "result": item})
            except BaseException as err:  # reaches the caller as the call's error
                loop.call_soon_threadsafe(chunks.put_nowait, err)

        loop.run_in_executor(self.readers, decode)
        try:
            while True:
                chunk = await chunks.get()
                if isinstance(chunk, BaseException):
                    raise chunk
                yield chunk
                if "result" in chunk:
                    break
        finally:  # done, failed or cancelled: a decode still running stops after its round
            cancelled.set()

    def metrics(self) -> dict:
        return self.worker.metrics()

    def __del__(self):
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.close()
