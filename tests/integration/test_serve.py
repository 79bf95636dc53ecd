"""`dvi serve` as a client meets it: the real CLI in its own process (Ray Serve, redis-server, the DeepSpeed
learner), the official `openai` client and plain HTTP against it, and SIGTERM's drain at the end.

One server for the module, on the tiny model with the byte tokenizer: an API key, one replica that holds
one request and queues one more (so a burst meets a full queue). The tests run in file order: the last
ones kill the replica and stop the server."""
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from run_fixtures import ServeProcess, free_port, read_jsonl, write_serve
from tiny_model import byte_tokenizer

KEY = "test-key"
MODEL = "tiny"



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    config = write_serve(tmp, free_port(), **{"serve.api_key": KEY, "serve.served_model_name": MODEL,
                                              "serve.max_ongoing_requests": 1, "serve.max_queued_requests": 1})
    proc = ServeProcess(config)
    yield proc, tmp
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url, api_key=KEY, max_retries=0, timeout=120)


def http(server, path: str, body: bytes | None = None, key: str | None = KEY) -> tuple[int, dict, dict]:
    """(status, JSON body, headers in lower case) of a raw request: what curl would see."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(server[0].url.removesuffix("/v1") + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
            body = json.loads(raw) if raw.startswith(b"{") else {"text": raw.decode()}
            return r.status, body, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), {k.lower(): v for k, v in err.headers.items()}


def plain_greedy(model_dir, ids: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_chat_completion_is_greedy_decoding_and_carries_dvi_numbers(server, client):
    messages = [{"role": "user", "content": "alpha beta gamma"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    choice = answer.choices[0]
    tokenizer = byte_tokenizer()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
        prompt = prompt["input_ids"]
    expected = tokenizer.decode(plain_greedy(server[1] / "model", list(prompt), 12), skip_special_tokens=True)
    assert choice.message.content == expected and choice.finish_reason == "length"
    assert answer.usage.prompt_tokens == len(prompt) and answer.usage.completion_tokens == 12
    dvi = answer.model_extra["dvi"]
    assert dvi["drafted"] >= dvi["accepted"] >= 0 and dvi["mean_accepted_length"] >= 1


def test_streamed_chat_joins_to_the_same_text_and_ends_with_usage(server, client):
    messages = [{"role": "user", "content": "delta eps zeta"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_completions_route_with_a_stop_sequence(server, client):
    full = client.completions.create(model=MODEL, prompt="theta eta", max_tokens=16, temperature=0)
    text = full.choices[0].text
    assert full.object == "text_completion" and len(text) > 2
    stop = text[2:4]  # a stop sequence the greedy answer meets: the text ends right before it
    cut = client.completions.create(model=MODEL, prompt="theta eta", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_repeats(server, client):
    """A seed repeats a sampled answer while the replica drafts the same way (docs/serving.md). The first token
    is drawn before anything is drafted, so it repeats whatever the policy, the head version or the load:
    one token with each of several seeds, twice, the same; and the seeds do not all draw the same token."""
    drawn = set()
    for seed in range(6):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": "beta"}], max_tokens=1, temperature=1.0,
                  seed=seed)
        first = client.chat.completions.create(**kw).choices[0].message.content
        assert client.chat.completions.create(**kw).choices[0].message.content == first, seed
        drawn.add(first)
    assert len(drawn) > 1


@pytest.mark.parametrize("body, status, code, words", [
    (b"{not json", 400, "invalid_json", "malformed JSON"),
    (json.dumps({"model": MODEL}).encode(), 400, "invalid_request", "messages"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a"}], "n": 2}).encode(), 400,
     "invalid_request", "n: this server supports only one choice"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a"}], "logprobs": True}).encode(), 400,
     "invalid_request", "logprobs"),
    (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "a"}]}).encode(), 404,
     "model_not_found", "gpt-9"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": 500}).encode(), 400,
     "context_length_exceeded", "max_tokens asks for 500 more"),
])
def test_bad_requests_get_the_openai_error_shape(server, body, status, code, words):
    got, answer, _ = http(server, "/v1/chat/completions", body)
    assert got == status and answer["error"]["code"] == code and words in answer["error"]["message"], answer
    assert set(answer["error"]) == {"message", "type", "code", "param"}


def test_the_api_key_is_required(server):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a"}]}).encode()
    for key in (None, "wrong"):
        status, answer, _ = http(server, "/v1/chat/completions", body, key=key)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    assert http(server, "/health", key=None)[0] == 200  # probes need no key
    status, models, _ = http(server, "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [MODEL]


def test_a_full_queue_answers_503_with_retry_after(server):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": 80}).encode()
    results = []

    def send():
        results.append(http(server, "/v1/chat/completions", body))

    threads = [threading.Thread(target=send) for _ in range(6)]  # one decodes, one waits, the rest find it full
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy = [(s, a, h) for s, a, h in results if s == 503]
    assert busy and any(s == 200 for s, _, _ in results), [s for s, _, _ in results]
    assert all(h.get("retry-after") and a["error"]["code"] == "server_busy" for _, a, h in busy), busy


def test_a_client_that_leaves_mid_stream_frees_the_replica(server, client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "gamma"}],
                                            max_tokens=80, temperature=0, stream=True)
    next(iter(stream))
    stream.close()  # the client hangs up after its first chunk
    time.sleep(1.0)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "eta"}], max_tokens=4)
    metrics = http(server, "/metrics")[1]["text"]
    abandoned = [line for line in metrics.splitlines() if line.startswith("dvi:requests_abandoned{")]
    assert abandoned and float(abandoned[0].split()[-1]) >= 1, abandoned


def test_metrics_page_counts_speculation_as_vllm_names_it(server, client):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "zeta eta"}], max_tokens=8)
    status, page, headers = http(server, "/metrics", key=None)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(page["text"]):  # prometheus_client's own parser
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    drafts = values[f'dvi:spec_decode_num_draft_tokens_total{{model_name="{MODEL}"}}']
    accepted = values[f'dvi:spec_decode_num_accepted_tokens_total{{model_name="{MODEL}"}}']
    per_pos = sum(v for k, v in values.items() if k.startswith("dvi:spec_decode_num_accepted_tokens_per_pos_total"))
    assert drafts > 0 and accepted == per_pos
    assert values[f'dvi:generation_tokens_total{{model_name="{MODEL}"}}'] > 0
    assert any(k.startswith("dvi:time_to_first_token_seconds_count") and v > 0 for k, v in values.items())
    assert any(k.startswith("dvi:head_version{") for k in values)
    assert any(k.startswith("dvi:transitions_written") and v > 0 for k, v in values.items())


def _replica_pid(run_dir) -> int:
    snapshots = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "actors" and r["actors"]]
    return snapshots[-1]["actors"][0]["pid"]


def test_a_killed_replica_fails_its_request_and_serve_brings_it_back(server, client):
    proc, tmp = server
    pid = _replica_pid(tmp / "serve")
    outcome = []

    def long_request():
        try:
            answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "eps"}],
                                                    max_tokens=80, temperature=0)
            outcome.append(("answer", answer.choices[0].finish_reason))
        except openai.APIStatusError as err:
            outcome.append((err.status_code, err.body))

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=150)
    assert not thread.is_alive(), "the request hung after its replica died"
    assert outcome and (outcome[0][0] == "answer" or outcome[0][0] in (500, 503)), outcome
    deadline = time.monotonic() + 180
    while True:  # Serve starts a new replica; until it loads, requests get an error, never a hang
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "eta"}], max_tokens=4)
            break
        except openai.APIStatusError:
            assert time.monotonic() < deadline, "no replica came back"
            time.sleep(2)
    time.sleep(2)  # the monitor's next snapshot
    assert _replica_pid(tmp / "serve") != pid


def test_sigterm_drains_and_writes_the_run_directory(server, client):
    proc, tmp = server
    assert proc.stop() == 0, proc.output[-3000:]
    run_dir = tmp / "serve"
    records = read_jsonl(run_dir / "requests.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(records) >= 10 and summary["requests_completed"] == len(records)
    assert summary["transitions_written"] > 0 and summary["versions_published"] >= 1, summary
    assert summary["counts_balance"] is True, summary
    assert (run_dir / "report.md").is_file() and "draining" in proc.output
