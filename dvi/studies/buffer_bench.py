"""Throughput of the replay buffer through a real redis-server, and weight sync latency: `dvi bench-buffer`.

Records are random but shaped like real ones: γ=4 drafted positions, top-16, no context window, at
SmolLM2's hidden size (576) and a 7B model's (4096). The head blob is the SmolLM2 head we would ship:
an adapter of two 576x1152 float32 matrices plus a rank-32 LoRA on the 576x49152 output projection.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

from selfspec.versions import package_versions

RECORDS = {"smollm2": 576, "7b": 4096}  # name -> hidden size
POSITIONS, TOP_K, VOCAB, LORA_RANK = 4, 16, 49152, 32


def run_buffer_bench(n: int, frame_size: int, write_batch: int, persistence: bool) -> dict:
    """Write and read `n` SmolLM2-sized transitions (n/5 7B-sized), each plain and int8-quantized, through a
    fresh local redis-server, then publish and pull head weights; the report (bench_buffer.json's content)."""
    from buffer.config import RedisConfig, StreamConfig
    from buffer.server import RedisServer

    if n < 100:
        raise ValueError("--n must be at least 100")
    report = {"command": "dvi bench-buffer", "n": n, "frame_size": frame_size,
              "write_batch": write_batch, "persistence": persistence,
              "cpus": os.cpu_count(), "load_avg_1m_before": round(os.getloadavg()[0], 2),
              "versions": package_versions(), "records": {}}
    with tempfile.TemporaryDirectory() as tmp, RedisServer(RedisConfig(persistence=persistence), tmp) as server:
        client = server.client()
        report["redis_version"] = client.info("server")["redis_version"]
        for name, hidden in RECORDS.items():
            count = n if name == "smollm2" else n // 5
            for quantize in (False, True):
                cfg = StreamConfig(maxlen=2 * count, frame_size=frame_size, write_batch=write_batch,
                                   batch_size=256, quantize_hidden=quantize, read_block_ms=0)
                label = name + ("-int8" if quantize else "")
                report["records"][label] = _bench_stream(client, label, hidden, count, cfg)
        report["weights"] = _bench_weights(client)
    return report


def _bench_stream(client, run_id: str, hidden: int, n: int, cfg) -> dict:
    import numpy as np

    from buffer.codec import decode_transition, encode_transition
    from buffer.keys import RunKeys
    from buffer.stream import TransitionReader, TransitionWriter
    from buffer.synthetic import random_transition

    rng = np.random.default_rng(0)
    pool = [random_transition(rng, n=POSITIONS, d=hidden, k=TOP_K, run_id=run_id, request_id=f"q{i}")
            for i in range(64)]
    blobs = [encode_transition(t, quantize_hidden=cfg.quantize_hidden) for t in pool]
    encode_s = _per_call(lambda: encode_transition(pool[0], quantize_hidden=cfg.quantize_hidden))
    decode_s = _per_call(lambda: decode_transition(blobs[0]))
    memory_before = client.info("memory")["used_memory"]

    writer = TransitionWriter(client, run_id, cfg)
    start = time.perf_counter()
    for i in range(n):
        t = pool[i % len(pool)]
        t.round = i  # a distinct transition id each time, so the reader's de-duplication keeps all
        writer.write(t)
    writer.flush()
    write_s = time.perf_counter() - start
    memory_after = client.info("memory")["used_memory"]

    reader = TransitionReader(client, run_id, cfg)
    start = time.perf_counter()
    while reader.counts["consumed"] < n:
        with reader.batch() as batch:
            if not batch.entry_ids:
                raise RuntimeError(f"read only {reader.counts['consumed']} of {n} transitions")
    read_s = time.perf_counter() - start
    keys = RunKeys(run_id)
    client.delete(keys.transitions, keys.stats)
    return {"hidden": hidden, "n": n, "write_tps": round(n / write_s), "read_tps": round(n / read_s),
            "bytes_per_transition": round(sum(map(len, blobs)) / len(blobs)),
            "redis_mb_per_10k": round((memory_after - memory_before) / n * 1e4 / 1e6, 1),
            "encode_us": round(encode_s * 1e6, 1), "decode_us": round(decode_s * 1e6, 1)}


def _bench_weights(client, versions: int = 10) -> dict:
    import numpy as np

    from buffer.weights import WeightStore
    from selfspec.head_format import HeadSpec

    rng = np.random.default_rng(0)
    d = RECORDS["smollm2"]
    arrays = {"adapter.up": rng.standard_normal((d, 2 * d), np.float32),
              "adapter.down": rng.standard_normal((2 * d, d), np.float32),
              "lm_head.lora_A": rng.standard_normal((LORA_RANK, d), np.float32),
              "lm_head.lora_B": rng.standard_normal((VOCAB, LORA_RANK), np.float32)}
    spec = HeadSpec.of(arrays, {}, base_model="SmolLM2-135M-Instruct")
    learner = WeightStore(client, "bench-weights", expected=spec)
    actor = WeightStore(client, "bench-weights", expected=spec)
    publish, pull, poll, size = [], [], [], 0
    for version in range(versions):
        start = time.perf_counter()
        size = learner.publish(version, arrays, {"base_model": spec.base_model})
        publish.append(time.perf_counter() - start)
        start = time.perf_counter()
        pulled = actor.pull_if_newer(version - 1 if version else None)
        pull.append(time.perf_counter() - start)
        start = time.perf_counter()
        actor.latest_version()
        poll.append(time.perf_counter() - start)
        if pulled is None or pulled[0] != version:
            raise RuntimeError(f"pulled {pulled and pulled[0]}, published {version}")
    client.delete(*client.keys(learner.keys.prefix + "*"))
    return {"blob_mb": round(size / 1e6, 2), "arrays": {k: list(a.shape) for k, a in arrays.items()},
            "weight_publish_ms": round(statistics.median(publish) * 1e3, 2),
            "weight_pull_ms": round(statistics.median(pull) * 1e3, 2),
            "weight_poll_ms": round(statistics.median(poll) * 1e3, 3)}


def _per_call(fn, repeat: int = 2000) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat
