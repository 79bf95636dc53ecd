"""The generation actor on a tiny random Llama, a real redis-server and (once) a real local Ray:
lossless decoding with one transition per round in the stream, newer heads swapped in between requests
(a corrupt blob, or a head that does not fit, refused and counted), bad requests reported while the actor
carries on, and the Ray actor serving the dispatcher's result dict."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from actors.config import GenerationConfig
from actors.dispatch import read_result
from actors.generation import GenerationWorker, start_actor
from buffer.config import StreamConfig
from buffer.keys import RunKeys
from buffer.stream import TransitionReader
from buffer.weights import WeightStore
from selfspec.drafter import head_weights
from selfspec.drafter import DrafterHead, HeadConfig
from selfspec.loading import ModelParts
from selfspec.split import SplitModel
from selfspec.transitions import KINDS
from tiny_model import plain_greedy, tiny_llama


HEAD = HeadConfig(adapter_hidden=32, lora_rank=4)
RUN = "gen"
# a repeated prompt so n-gram copies happen next to head drafts
PROMPT = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7]


class ByteTokenizer:
    """Bytes as token ids and a made-up chat template: enough for text requests to a 256-id model."""
    chat_template = "tags"

    def __call__(self, text: str) -> dict:
        return {"input_ids": list(text.encode("latin-1", "replace"))}

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, return_dict=True) -> dict:
        return self("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")

    def decode(self, ids, skip_special_tokens=True) -> str:
        return bytes(ids).decode("latin-1")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3)


def model_parts(model, noise: float = 0.05) -> ModelParts:
    split = SplitModel(model, 2)
    head = DrafterHead(split, HEAD)
    torch.manual_seed(1)
    with torch.no_grad():  # an untrained LoRA is zero: perturb so drafts are sometimes right, sometimes wrong
        head.proj.lora_B.default.weight.copy_(torch.randn_like(head.proj.lora_B.default.weight) * noise)
    return ModelParts(model, ByteTokenizer(), split, head, {"base_model": "tiny"})


def config(**kw) -> GenerationConfig:
    base = dict(model="tiny", exit_layer=2, head=HEAD, gamma=4, length_policy="fixed", ngram=1, topk=8,
                weights_check_every_rounds=1, num_threads=1,
                stream=StreamConfig(frame_size=4, write_batch=64, flush_interval_s=60))
    return GenerationConfig(**{**base, **kw})


def request(i: int, **kw) -> dict:
    return {"request_id": f"r{i}", "workload": "test", "prompt_ids": PROMPT, "max_new_tokens": 24,
            "temperature": 0.0, **kw}


def read_all(client) -> list:
    reader, out = TransitionReader(client, RUN, StreamConfig(frame_size=4)), []
    while batch := reader.read(count=256, block_ms=0).transitions:
        out += batch
    return out


def test_decodes_losslessly_and_streams_the_prompt_and_one_transition_per_round(model, redis_client):
    gen = GenerationWorker(config(), RUN, actor_id=3, redis_client=redis_client, parts=model_parts(model))
    result = gen.generate(request(0))
    assert read_result(result, "r0") is None
    assert result["output_ids"] == plain_greedy(model, PROMPT, 24) and result["tokens"] == 24
    assert 0 < result["t_first_token_s"] < result["t_total_s"] and result["mean_accepted_length"] > 1
    transitions = read_all(redis_client)
    # the prompt's positions first (KL rows, round 0), then one transition per round
    assert len(transitions) == 1 + result["rounds"] == gen.metrics()["transitions_written"]
    assert transitions[0].round == 0 and {KINDS[k] for k in transitions[0].kind} == {"distill"}
    assert transitions[0].n == len(PROMPT)
    assert {t.request_id for t in transitions} == {"r0"} and {t.actor_id for t in transitions} == {3}
    assert {t.workload for t in transitions} == {"test"}
    kinds = {KINDS[k] for t in transitions for k in t.kind}
    assert {"drafted", "copied"} <= kinds, kinds
    m = gen.metrics()
    assert m["requests_done"] == 1 and m["tokens"] == 24 and m["drafted"] == result["drafted"] > 0
    assert m["rounds"] == result["rounds"] and m["tokens_per_s"] > 0 and m["queue_depth"] == 0


def test_newer_head_is_swapped_in_between_requests_and_a_corrupt_blob_refused(model, redis_client):
    gen = GenerationWorker(config(), RUN, redis_client=redis_client, parts=model_parts(model))
    learner = WeightStore(redis_client, RUN)
    meta = {"base_model": "tiny", "head": HEAD.model_dump(), "exit_layer": 2}

    assert gen.generate(request(0))["head_version"] is None  # nothing published: its own head
    assert gen.metrics()["head_lag"] is None
    newer = model_parts(model, noise=0.0).head  # a visibly different head: LoRA B all zero
    learner.publish(1, head_weights(newer)[0], meta)
    r1 = gen.generate(request(1))
    assert r1["error"] is None and r1["head_version"] == 1 and r1["output_ids"] == plain_greedy(model, PROMPT, 24)
    assert torch.equal(gen.head.proj.lora_B.default.weight, newer.proj.lora_B.default.weight)
    m = gen.metrics()
    assert (m["head_version"], m["latest_published"], m["head_lag"], m["weights_swaps"]) == (1, 1, 0, 1)

    keys = RunKeys(RUN)  # a corrupt v2: the actor refuses it, counts it once and keeps v1
    redis_client.set(keys.weights(2), b"not a weights blob")
    redis_client.set(keys.weights_latest, 2)
    kept = gen.head.proj.lora_B.default.weight.clone()
    for i in (2, 3):
        assert gen.generate(request(i))["error"] is None
    m = gen.metrics()
    assert (m["head_version"], m["head_lag"], m["weights_refused"], m["requests_done"]) == (1, 1, 1, 4)
    assert "v2 refused" in m["last_weights_problem"]
    assert torch.equal(gen.head.proj.lora_B.default.weight, kept)
    by_request = {}
    for t in read_all(redis_client):
        by_request.setdefault(t.request_id, set()).add(t.head_version)
    assert by_request == {"r0": {0}, "r1": {1}, "r2": {1}, "r3": {1}}


@pytest.mark.parametrize("kind, problem", [("exit layer", "exit layer 3, expected 2"),
                                           ("shape", "proj.lora_B.default.weight: shape (256, 2), expected (256, 4)")])
def test_a_head_that_does_not_fit_is_refused_by_the_one_rule_and_counted(model, redis_client, kind, problem):
    gen = GenerationWorker(config(), RUN, redis_client=redis_client, parts=model_parts(model))
    arrays, meta = head_weights(model_parts(model, noise=0.0).head)
    if kind == "exit layer":
        meta["exit_layer"] = 3
    else:
        arrays["proj.lora_B.default.weight"] = np.zeros((256, 2))
    WeightStore(redis_client, RUN).publish(1, arrays, meta | {"base_model": "tiny"})
    assert gen.generate(request(0))["head_version"] is None  # kept its own head
    m = gen.metrics()
    assert (m["weights_refused"], m["weights_swaps"]) == (1, 0)
    assert m["last_weights_problem"] == f"weights v1 refused: {problem}"  # selfspec.head_format.HeadSpec.problem


def test_bad_requests_are_reported_and_the_actor_carries_on(model, redis_client):
    gen = GenerationWorker(config(), RUN, redis_client=redis_client, parts=model_parts(model))
    too_long = gen.generate({"request_id": "long", "workload": "x", "prompt": "y" * 200, "max_new_tokens": 4})
    assert too_long["error"].startswith("ValueError: prompt has 200 tokens") and too_long["tokens"] == 0
    malformed = gen.generate({"request_id": "bad", "workload": "x", "max_new_tokens": 4,
                              "messages": [{"role": "user", "content": 7}]})
    assert malformed["error"].startswith("ValueError: malformed message")
    neither = gen.generate({"request_id": "none", "workload": "x", "max_new_tokens": 4})
    assert "exactly one of" in neither["error"]
    # a chat request, then its second turn: the placeholder is filled with this actor's own answer
    turn0 = {"request_id": "c0", "workload": "new-workload", "conversation_id": "c", "max_new_tokens": 6,
             "messages": [{"role": "user", "content": "hi"}]}
    first = gen.generate(turn0)
    assert first["error"] is None and first["tokens"] == 6
    answer = ByteTokenizer().decode(first["output_ids"])
    turn1 = {**turn0, "request_id": "c1", "messages": [*turn0["messages"], {"role": "assistant", "content": None},
                                                       {"role": "user", "content": "more"}]}
    second = gen.generate(turn1)
    expected_prompt = ByteTokenizer().apply_chat_template([{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": answer},
                                                          {"role": "user", "content": "more"}])["input_ids"]
    assert second["error"] is None and second["prompt_tokens"] == len(expected_prompt)
    assert second["output_ids"] == plain_greedy(model, expected_prompt, 6)
    m = gen.metrics()
    assert (m["requests_failed"], m["requests_done"]) == (3, 2)
    with pytest.raises(ValidationError, match="gama"):  # a misspelt config key is an error naming it
        GenerationConfig(gama=4)


@pytest.mark.parametrize("max_batch", [1, 2])
def test_concurrent_callers_share_the_batch_without_redis(model, max_batch):
    # no Redis: a serving baseline without streaming or weight pulls; callers on threads (as Ray's
    # threaded actor calls it) decode together up to max_batch, the rest queue; each gets its own tokens
    gen = GenerationWorker(config(max_batch=max_batch), RUN, parts=model_parts(model))
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(gen.generate, [request(i, max_new_tokens=20 + i) for i in range(3)]))
    for i, r in enumerate(results):
        assert r["error"] is None and r["output_ids"] == plain_greedy(model, PROMPT, 20 + i)
    m = gen.metrics()
    assert (m["requests_done"], m["queue_depth"], m["transitions_written"], m["head_lag"]) == (3, 0, 0, None)
    assert m["batch_size"] == 0 and 1 <= m["mean_batch_size"] <= max_batch
    assert m["batch_rounds"] < m["rounds"] if max_batch > 1 else m["batch_rounds"] == m["rounds"]


def test_ray_actor_serves_a_request(model, redis_server):
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # the default length policy (cost-aware, measured at start-up) through Ray
        cfg = config(length_policy="cost_aware", num_cpus=1, max_restarts=1)
        tiny = model_parts(model)
        tiny.tokenizer = None  # the test module's tokenizer class cannot be unpickled in a Ray worker
        actor = start_actor(cfg, RUN, 0, redis_url=redis_server.url, parts=tiny)
        result = ray.get(actor.generate.remote(request(0)), timeout=120)
        assert read_result(result, "r0") is None and result["tokens"] == 24
        assert result["output_ids"] == plain_greedy(model, PROMPT, 24)
        metrics = ray.get(actor.metrics.remote(), timeout=30)
        assert metrics["requests_done"] == 1 and metrics["transitions_written"] == 1 + result["rounds"]
        assert metrics["pid"] != os.getpid()
    finally:
        ray.shutdown()
    assert np.isfinite(result["t_total_s"])


def test_actor_loads_its_model_with_the_configs_dtype_and_steps(tmp_path):
    from tiny_model import save_tiny_model

    from selfspec.passes import StaticPasses

    model_dir = save_tiny_model(tmp_path / "model")
    gen = GenerationWorker(config(model=str(model_dir), dtype="float32", passes="static"), RUN)
    assert isinstance(gen.decoder.passes, StaticPasses) and gen.parts.split.dtype == torch.float32
    result = gen.generate(request(0, max_new_tokens=12))
    assert result["error"] is None and result["output_ids"] == plain_greedy(gen.parts.model, PROMPT, 12)
    with pytest.raises(ValidationError, match="passes"):
        GenerationConfig(passes="fast")
