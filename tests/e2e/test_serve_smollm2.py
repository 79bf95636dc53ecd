"""`dvi serve` on the real default model (SmolLM2-135M): the official openai client gets, greedily, exactly
what `dvi generate` prints and what transformers' own generate decodes, streamed or not, chat or text."""
import subprocess

import openai
import pytest
import torch
import yaml
from run_fixtures import DVI, ServeProcess, dvi_env, free_port

from selfspec.model import load_model
from selfspec.prompts import chat_ids

MODEL = "smollm2-135m"
PROMPTS = ["What is the capital of France? Answer in one sentence.", "Write a Python function that adds two numbers."]
N = 32


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_smollm2")
    config = tmp / "serve.yaml"
    config.write_text(yaml.safe_dump({"model": MODEL, "learn": False, "out_dir": str(tmp / "serve"),
                                      "actors": {"count": 1, "num_cpus": 1},
                                      "serve": {"port": free_port(), "drain_timeout_s": 10}}))
    proc = ServeProcess(config)
    yield proc
    assert proc.stop() == 0, proc.output[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def transformers_greedy():
    model, tokenizer = load_model(MODEL)

    def run(prompt: str) -> str:
        ids = chat_ids(tokenizer, prompt)
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False)[0, len(ids):]
        return tokenizer.decode(out, skip_special_tokens=True)
    return run


def dvi_generate(prompt: str) -> str:
    out = subprocess.run([DVI, "generate", "--prompt", prompt, "--max-new-tokens", str(N)], env=dvi_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.rsplit("\n\n[", 1)[0]  # the text, then a blank line and the [stats] line


def test_models_list_names_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_chat_equals_transformers_streamed_or_not(client, transformers_greedy, prompt):
    messages = [{"role": "user", "content": prompt}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=N, temperature=0)
    streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=N, temperature=0,
                                              stream=True)
    text = whole.choices[0].message.content
    assert text == transformers_greedy(prompt)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_greedy_chat_equals_dvi_generate(client):
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}],
                                            max_tokens=N, temperature=0)
    assert dvi_generate(PROMPTS[0]) == answer.choices[0].message.content


def test_text_completion_streamed_and_not(client):
    kw = dict(model=MODEL, prompt="The three primary colors are", max_tokens=16, temperature=0)
    whole = client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert whole.choices[0].text == streamed and len(whole.choices[0].text) > 0
    assert whole.usage.completion_tokens == 16 and whole.choices[0].finish_reason == "length"
