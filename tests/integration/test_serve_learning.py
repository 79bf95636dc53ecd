"""Learning through the API: `dvi serve` on a tiny model whose next token a head can learn
(learner_data.verifier), 60 requests over HTTP with the official client, then SIGTERM. Versions are
published while it serves, a later answer drafts with a newer head, the held-out MAL of the last version
beats the first, and the stream's counts balance."""
import json
import time

import openai
import pytest
import torch
from learner_data import verifier
from run_fixtures import ServeProcess, free_port, read_jsonl, write_serve
from tiny_model import byte_tokenizer, write_prompts

TOPICS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_learning")
    verifier(torch.float32).save_pretrained(tmp / "model")
    byte_tokenizer().save_pretrained(tmp / "model")
    heldout = write_prompts(tmp / "heldout.jsonl", [" ".join(TOPICS[i:i + 2]) * 3 for i in range(4)])
    config = write_serve(tmp, free_port(), **{"learner.heldout": {"workload": str(heldout), "prompts": 4,
                                                                  "max_new_tokens": 16, "collect_batch": 1},
                                              "learner.lr": 3e-3, "learner.reuse": 4,
                                              "head": {"adapter_hidden": 128, "lora_rank": 8, "draft_vocab": None}})
    proc = ServeProcess(config)
    yield proc, tmp
    proc.stop()


def test_the_head_learns_from_traffic_over_http(server):
    proc, tmp = server
    client = openai.OpenAI(base_url=proc.url, api_key="none", max_retries=0, timeout=120)
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

    assert proc.stop() == 0, proc.output[-3000:]
    run_dir = tmp / "serve"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["requests_completed"] == 60 and summary["counts_balance"] is True, summary
    scores = [v["heldout_mal"] for v in read_jsonl(run_dir / "learner" / "versions.jsonl")]
    assert None not in scores and scores[-1] > scores[0], scores
