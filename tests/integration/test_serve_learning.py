"""`dvi serve` on a tiny model whose next token a head can learn (learner_data.verifier), with an API key:

- learning through the API: 60 requests over HTTP with the official client; versions are published while
  it serves, a later answer drafts with a newer head, and the held-out MAL of the last version beats the
  first (the drain and the stream's counts: test_serve.py);
- `dvi bench-serve` against it: the trace's requests go over HTTP through the dispatcher of `dvi run`, and
  the report holds every number it promises.

One server for the module (run_fixtures.ServeProcess); the learning test runs first."""
import json
import time

import openai
import pytest
import torch
from learner_data import verifier
from run_fixtures import ServeProcess, free_port, read_jsonl, request, write_serve
from tiny_model import byte_tokenizer, write_prompts

from dvi import cli
from dvi.studies.serve_bench import requests_path

TOPICS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
KEY = "bench-key"
MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_learning")
    verifier(torch.float32).save_pretrained(tmp / "model")
    byte_tokenizer().save_pretrained(tmp / "model")
    heldout = write_prompts(tmp / "heldout.jsonl", [" ".join(TOPICS[i:i + 2]) * 3 for i in range(4)])
    config = write_serve(tmp, free_port(), **{"learner.heldout": {"workload": str(heldout), "prompts": 4,
                                                                  "max_new_tokens": 16, "collect_batch": 1},
                                              "serve.api_key": KEY, "serve.served_model_name": MODEL,
                                              "learner.lr": 3e-3, "learner.reuse": 4,
                                              "head": {"adapter_hidden": 128, "lora_rank": 8, "draft_vocab": None}})
    proc = ServeProcess(config)
    yield proc, tmp
    proc.stop()


def test_the_head_learns_from_traffic_over_http(server):
    proc, tmp = server
    client = openai.OpenAI(base_url=proc.url, api_key=KEY, max_retries=0, timeout=120)
    versions_file = tmp / "serve" / "learner" / "versions.jsonl"
    deadline = time.monotonic() + 240
    while not (versions_file.exists() and versions_file.read_text().strip()):  # the learner's set-up
        assert time.monotonic() < deadline, proc.output[-3000:]
        time.sleep(1)
    model = client.models.list().data[0].id
    served = []
    for i in range(60):
        words = " ".join(TOPICS[i % 7:i % 7 + 2]) * 3
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": words}],
                                                max_tokens=24, temperature=0)
        served.append(answer.model_extra["dvi"]["head_version"])
    published = [v for v in served if v is not None]
    assert published and published[-1] > published[0], served
    deadline = time.monotonic() + 120
    while True:  # the versions published last are scored once they are out
        scores = [v["heldout_mal"] for v in read_jsonl(versions_file)]
        if None not in scores or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert None not in scores and scores[-1] > scores[0], scores


def chat(rid: str, messages: list, arrival_s: float = 0.0, max_new_tokens: int = 8, **fields) -> dict:
    return {"arrival_s": arrival_s, "request_id": rid, "workload": "chat", "messages": messages,
            "max_new_tokens": max_new_tokens, "temperature": 0.0, **fields}


def bench(tmp_path, monkeypatch, proc: ServeProcess, rows: list, *flags: str) -> tuple[int, dict, list[dict]]:
    monkeypatch.setattr(cli, "COMMANDS", {"bench-serve": "dvi.cli.bench_serve"})
    trace, out = tmp_path / "trace.jsonl", tmp_path / "bench.json"
    trace.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    code = cli.main(["bench-serve", "--url", proc.url, "--trace", str(trace), "--out", str(out), "--no-progress",
                     *flags])
    if code != 0:
        return code, {}, []
    records = [json.loads(line) for line in requests_path(out).read_text().splitlines()]
    return code, json.loads(out.read_text()), records


def test_a_trace_replays_over_http_with_every_metric(server, tmp_path, monkeypatch, capsys):
    first = [{"role": "user", "content": "alpha beta"}]
    rows = [chat("t0", first, conversation_id="conv"),
            chat("t1", first + [{"role": "assistant", "content": None}, {"role": "user", "content": "gamma"}],
                 conversation_id="conv"),
            chat("c2", [{"role": "user", "content": "delta eps"}]),
            request(3, "code", max_new_tokens=8), request(4, "code", max_new_tokens=12),
            request(5, "code", max_new_tokens=8, temperature=3.0),  # the trace allows it, the API does not: a 400
            "not json"]
    code, report, records = bench(tmp_path, monkeypatch, server[0], rows, "--api-key", KEY,
                                  "--arrival", "{kind: closed_loop, users: 2}")
    printed = capsys.readouterr().out
    assert code == 0, printed
    s = report["summary"]
    assert (report["model"], report["clients"], report["arrival"]["kind"]) == (MODEL, 2, "closed_loop")
    assert report["versions"]["openai"] and report["url"] == server[0].url
    assert (s["requests"], s["completed"], s["failed"]) == (7, 5, 2), s["errors"]
    assert any(e.startswith("HTTP 400: temperature") for e in s["errors"])
    assert any("not JSON" in e for e in s["errors"])
    by_id = {r["request_id"]: r for r in records}
    assert len(records) == 7 and not by_id["r0005"]["ok"]
    ok = [r for r in records if r["ok"]]
    for r in ok:
        e = r["extra"]
        limit = 12 if r["request_id"] == "r0004" else 8
        assert e["tokens_from"] == "usage" and 0 < r["tokens"] <= limit and e["prompt_tokens"] > 0, r
        assert 0 < e["http_ttft_s"] <= e["http_latency_s"] and len(e["itl_s"]) == e["chunks"] - 1, r
        assert e["finish_reason"] in ("length", "stop") and r["mean_accepted_length"] >= 1
        assert e["drafted"] >= e["accepted"] >= 0 and e["replica"] == 0
    assert s["output_tokens"] == sum(r["tokens"] for r in ok)
    assert s["input_tokens"] == sum(r["extra"]["prompt_tokens"] for r in ok)
    assert s["total_tokens_per_s"] > s["output_tokens_per_s"] > 0 and s["request_throughput"] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert 0 < s[key]["median"] <= s[key]["p90"] <= s[key]["p99"], key
    assert s["mean_accepted_length"] >= 1 and s["requests_with_mal"] == 5
    assert 1 <= s["max_concurrent_requests"] <= 2  # two users
    # the later turn went, after the first, to the client that holds the first turn's answer, and carried it
    t0, t1 = by_id["t0"], by_id["t1"]
    assert t1["ok"] and t1["actor"] == t0["actor"] and t1["sent_s"] >= t0["done_s"]
    empty_answer = byte_tokenizer().apply_chat_template(
        first + [{"role": "assistant", "content": ""}, {"role": "user", "content": "gamma"}],
        add_generation_prompt=True, tokenize=True)
    if isinstance(empty_answer, dict) or hasattr(empty_answer, "input_ids"):
        empty_answer = empty_answer["input_ids"]
    assert t1["extra"]["prompt_tokens"] > len(empty_answer)  # t0's answer filled the placeholder
    for label in ("TTFT (ms) median", "TPOT (ms) p99", "ITL (ms) mean", "E2E latency (ms) p90",
                  "output token throughput", "mean accepted length", "failed x1: HTTP 400: temperature"):
        assert label in printed, label


def test_recorded_arrivals_rescaled_and_a_client_per_request(server, tmp_path, monkeypatch):
    rows = [request(i, "code", arrival_s=0.4 * i, max_new_tokens=4) for i in range(4)]
    code, report, records = bench(tmp_path, monkeypatch, server[0], rows, "--api-key", KEY, "--model", MODEL,
                                  "--arrival", "{kind: recorded, time_scale: 0.5}")
    assert code == 0 and report["clients"] == 4 and report["summary"]["completed"] == 4
    assert [r["arrival_s"] for r in records] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert all(r["sent_s"] >= r["arrival_s"] for r in records)


def test_a_wrong_key_is_one_line(server, tmp_path, monkeypatch, capsys):
    code, _, _ = bench(tmp_path, monkeypatch, server[0], [request(0, "code")], "--api-key", "wrong")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "refused the API key (HTTP 401)" in err, err
