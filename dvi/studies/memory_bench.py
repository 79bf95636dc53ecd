"""What the traffic memory costs at its bound: `dvi bench-memory`.

The index is filled to `max_tokens` with the model's tokens of Spec-Bench's questions, then Zipf-drawn
token sequences (distinct n-grams: the index's worst case for memory) until the bound. Measured: the
index's memory (tracemalloc) and insert speed; proposals for text tails taken from stored and unseen
questions (median and p99 µs), against one plain decode step of the model on this machine; and, through a
fresh local redis-server, the `served` stream at the actors' default cap and how long a new actor takes
to read it back (catch-up).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
import tracemalloc

import numpy as np

from selfspec.versions import package_versions


def run_memory_bench(parts, questions: list[list[int]], max_tokens: int, sequence_tokens: int, stream_maxlen: int,
                     seed: int = 0) -> dict:
    """`questions`: token ids of real text (stored first, the last tenth held back as unseen text)."""
    from selfspec.suffix_index import SuffixIndex, SuffixIndexConfig

    rng = np.random.default_rng(seed)
    held = questions[-max(1, len(questions) // 10):]
    stored = questions[:-len(held)] or questions
    vocab = parts.split.config.vocab_size
    sequences = [q[:sequence_tokens] for q in stored]
    while sum(map(len, sequences)) < max_tokens:
        sequences.append((rng.zipf(1.3, sequence_tokens) % vocab).tolist())
    index = SuffixIndex(SuffixIndexConfig(max_sequences=len(sequences), max_tokens=max_tokens))
    tracemalloc.start()
    start = time.perf_counter()
    for seq in sequences:
        index.insert(seq)
    insert_s = time.perf_counter() - start
    memory_mb = tracemalloc.get_traced_memory()[0] / 2**20
    tracemalloc.stop()
    texts = [q for q in stored + held if len(q) > 8]
    tails = [q[:int(rng.integers(8, len(q)))] for q in (texts[i] for i in rng.integers(0, len(texts), 2000))]
    times, found = [], 0
    for text in tails:
        t = time.perf_counter()
        proposal = index.propose(text, 4)
        times.append(time.perf_counter() - t)
        found += bool(proposal.tokens)
    step_s = _decode_step_s(parts, stored[0])
    report = {"command": "dvi bench-memory", "cpus": os.cpu_count(), "versions": package_versions(),
              "max_tokens": max_tokens, "sequences": len(index), "tokens": index.live_tokens,
              "index_mb": round(memory_mb, 1), "insert_tokens_per_s": round(index.live_tokens / insert_s),
              "propose_p50_us": round(statistics.median(times) * 1e6, 1),
              "propose_p99_us": round(float(np.quantile(times, 0.99)) * 1e6, 1),
              "proposals_found": round(found / len(tails), 3), "decode_step_ms": round(step_s * 1e3, 2)}
    report["propose_p50_share_of_step"] = round(statistics.median(times) / step_s, 5)
    report["stream"] = _bench_stream(sequences[-stream_maxlen:], stream_maxlen)
    return report


def _decode_step_s(parts, prompt: list[int], tokens: int = 32) -> float:
    """Seconds per token of plain (γ=0) decoding, one request, on this machine."""
    from selfspec.engine import SelfSpecDecoder

    decoder = SelfSpecDecoder(parts.split, None, passes=parts.passes)
    decoder.generate(prompt, max_new_tokens=4, eos_ids=set())
    result = decoder.generate(prompt, max_new_tokens=tokens, eos_ids=set())
    return (result.t_total - result.t_prefill) / (tokens - 1)


def _bench_stream(sequences: list[list[int]], maxlen: int) -> dict:
    """The served stream holding `sequences` (up to its cap): its size in Redis, and a new actor's catch-up."""
    from actors.config import MemoryConfig
    from actors.traffic_memory import TrafficMemory
    from buffer.config import RedisConfig
    from buffer.keys import RunKeys
    from buffer.served import ServedLog
    from buffer.server import RedisServer

    with tempfile.TemporaryDirectory() as tmp, RedisServer(RedisConfig(persistence=False), tmp) as server:
        client = server.client()
        writer = ServedLog(client, "bench", "writer", maxlen)
        for seq in sequences:
            writer.append(seq)
        entries = client.xlen(RunKeys("bench").served)
        stream_mb = client.memory_usage(RunKeys("bench").served, samples=0) / 2**20
        memory = TrafficMemory(MemoryConfig(max_sequences=len(sequences), max_tokens=sum(map(len, sequences)),
                                            stream_maxlen=maxlen), ServedLog(client, "bench", "reader", maxlen))
        memory.catch_up()
    return {"entries": entries, "stream_mb": round(stream_mb, 1), "catch_up_s": round(memory.catch_up_s, 2),
            "caught_up_sequences": len(memory.index)}
