"""The traffic memory shared through a real redis-server (`dvi:{run}:served`): what one actor served, another
drafts from on its next request, losslessly; a new or restarted actor reads the run's memory back from the
stream; a corrupt entry is dead-lettered and counted, the others stored."""
from __future__ import annotations

import numpy as np
import pytest
from test_generation import HEAD, model_parts
from tiny_model import plain_greedy, tiny_llama

from actors.config import GenerationConfig, MemoryConfig
from actors.generation import GenerationWorker
from buffer.keys import RunKeys
from buffer.served import encode_tokens

RUN = "mem"
PROMPTS = [np.random.default_rng(i).integers(0, 256, 12).tolist() for i in range(3)]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3)


def config(memory: str, **kw) -> GenerationConfig:
    # no copies of the request's own text: what is copied, the memory drafted (the head drafts the rest)
    return GenerationConfig(model="tiny", exit_layer=2, head=HEAD, gamma=4, length_policy="fixed", ngram=0, topk=8, num_threads=1,
                            memory=memory, memory_bounds=MemoryConfig(**kw))


def worker(model, client, memory: str, actor_id: int, **kw) -> GenerationWorker:
    return GenerationWorker(config(memory, **kw), RUN, actor_id, redis_client=client, parts=model_parts(model))


def serve(w: GenerationWorker, prompt: list[int], i: int) -> dict:
    out = w.generate({"request_id": f"{w.actor_id}-{i}", "prompt_ids": prompt, "max_new_tokens": 24})
    assert out["error"] is None, out["error"]
    return out


def test_what_one_actor_served_another_drafts_from(model, redis_client):
    """A serves a prompt; B (shared) serving the same prompt drafts A's response from the memory, accepted,
    and decodes plain greedy; C (local) has only its own memory: nothing remembered on its first request,
    its own response on the second."""
    a = worker(model, redis_client, "shared", 0)
    b = worker(model, redis_client, "shared", 1)
    c = worker(model, redis_client, "local", 2)
    try:
        expected = plain_greedy(model, PROMPTS[0], 24)
        assert serve(a, PROMPTS[0], 0)["output_ids"] == expected
        got = serve(b, PROMPTS[0], 0)
        assert got["output_ids"] == expected
        assert got["drafted_by_kind"].get("remembered", 0) > 0 and got["accepted_by_kind"]["remembered"] > 0
        assert b.metrics()["memory_shared_read"] == 1 and b.metrics()["memory_sequences"] == 1
        alone = serve(c, PROMPTS[0], 0)
        assert alone["output_ids"] == expected and "remembered" not in alone["drafted_by_kind"]
        again = serve(c, PROMPTS[0], 1)  # its own response, stored between requests
        assert again["output_ids"] == expected and again["accepted_by_kind"]["remembered"] > 0
        assert c.metrics()["memory_shared_read"] == 0
    finally:
        for w in (a, b, c):
            w.close()


def test_a_related_request_drafts_what_another_actor_served(model, redis_client):
    """Not a repeat: B's prompt is A's prompt with the start of A's answer after it (a "go on" request). B
    drafts the rest of that answer from the shared memory, accepted, and decodes its own prompt plain greedy."""
    a = worker(model, redis_client, "shared", 0)
    b = worker(model, redis_client, "shared", 1)
    try:
        served = serve(a, PROMPTS[0], 0)["output_ids"]
        related = [*PROMPTS[0], *served[:6]]
        got = serve(b, related, 0)
        assert got["output_ids"] == plain_greedy(model, related, 24)
        assert got["drafted_by_kind"].get("remembered", 0) > 0 and got["accepted_by_kind"]["remembered"] > 0
    finally:
        for w in (a, b):
            w.close()


def test_a_new_actor_catches_up_and_corrupt_entries_are_dead_lettered(model, redis_client):
    """Two responses served, one corrupt entry in the stream: a new actor (or the first one restarted) reads
    the two back before serving (timed), dead-letters the corrupt one and counts it, and drafts from them."""
    first = worker(model, redis_client, "shared", 0)
    try:
        for i, prompt in enumerate(PROMPTS[:2]):
            serve(first, prompt, i)
    finally:
        first.close()
    keys = RunKeys(RUN)
    redis_client.xadd(keys.served, {"origin": "elsewhere", "response": b"\x01\x02\x03"})  # not int32s
    restarted = worker(model, redis_client, "shared", 0)
    try:
        m = restarted.metrics()
        assert m["memory_sequences"] == 2 and m["memory_shared_read"] == 2 and m["memory_shared_corrupt"] == 1
        assert m["memory_catch_up_s"] is not None and m["memory_tokens"] == 48
        letters = redis_client.xrange(keys.deadletter)
        assert len(letters) == 1 and letters[0][1][b"stream"] == keys.served.encode()
        got = serve(restarted, PROMPTS[1], 9)
        assert got["output_ids"] == plain_greedy(model, PROMPTS[1], 24) and got["accepted_by_kind"]["remembered"] > 0
    finally:
        restarted.close()
    assert encode_tokens([1, 2]) == b"\x01\x00\x00\x00\x02\x00\x00\x00"


def test_memory_bounds_hold_and_prompts_go_in_when_asked(model, redis_client):
    """max_sequences 2: after three responses the memory holds the last two; with prompts on, a response
    is stored after its prompt, so a repeated prompt drafts from its first round on."""
    w = worker(model, redis_client, "local", 0, max_sequences=2, prompts=True)
    try:
        for i, prompt in enumerate(PROMPTS):
            serve(w, prompt, i)
        serve(w, PROMPTS[2], 3)  # stores the third (prompt + response) before it joins
        assert w.metrics()["memory_sequences"] == 2
        got = serve(w, PROMPTS[2], 4)
        assert got["output_ids"] == plain_greedy(model, PROMPTS[2], 24)
        rounds_to_end = got["rounds"]
        assert rounds_to_end <= 24 // 5 + 2, "a remembered prompt + response drafts the whole answer"
    finally:
        w.close()
    with pytest.raises(ValueError):
        MemoryConfig(max_sequences=0)


def test_bench_memory_fills_to_the_bound_and_reads_the_stream_back(model):
    """`dvi bench-memory`'s study on the tiny model: the index holds the bound's tokens, proposals are found
    for stored text, and a new reader catches up on every entry the capped stream kept."""
    from dvi.studies.memory_bench import run_memory_bench

    rng = np.random.default_rng(0)
    questions = [rng.integers(0, 256, int(rng.integers(20, 60))).tolist() for _ in range(30)]
    report = run_memory_bench(model_parts(model), questions, max_tokens=4_000, sequence_tokens=100, stream_maxlen=20)
    assert 3_800 < report["tokens"] <= 4_000 and report["index_mb"] > 0 and report["proposals_found"] > 0.5
    assert 0 < report["propose_p50_us"] <= report["propose_p99_us"] and report["decode_step_ms"] > 0
    stream = report["stream"]
    assert stream["entries"] == 20 and stream["caught_up_sequences"] == 20
