"""`dvi bench` on the tiny model. With --concurrency: N requests in flight on one decoder (or HF generate on N
prompts at once), the report's shape, and that batching changes no dvi token against hf_ar at batch 1. At
batch 1: the traffic-memory methods."""
from __future__ import annotations

import json

import pytest
from tiny_model import save_tiny_model, write_prompts

from dvi import cli

PROMPTS = ["Sort a list.", "Why is the sky blue?", "Write a haiku about rain.", "Add 2 and 3."]
LEVEL_KEYS = {"tokens_per_s", "tokens_per_s_per_request", "ttft_p50_s", "latency_p50_s", "identical_to_ar", "tokens",
              "seconds", "tokens_per_s_runs"}


@pytest.fixture
def bench_args(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"bench": "dvi.cli.bench"})
    model = save_tiny_model(tmp_path / "model")
    prompts = write_prompts(tmp_path / "q.jsonl", PROMPTS)
    return ["bench", "--model", str(model), "--prompts", str(prompts), "--n", "4", "--max-new-tokens", "6", "-k", "2",
            "--gamma", "3", "--out", str(tmp_path / "bench.json")]


def test_concurrency_report_and_tables(bench_args, tmp_path, capsys):
    assert cli.main([*bench_args, "--concurrency", "1,2", "--repeat", "2"]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["repeat"] == 2
    assert [m["name"] for m in report["methods"]] == ["hf_ar"]  # batch 1: the reference alone
    levels = report["by_concurrency"]
    assert list(levels) == ["1", "2"]
    for n, methods in levels.items():
        assert list(methods) == ["hf_batched", "dvi_ar", "dvi_spec_ngram", "dvi_spec_ngram_dynamic"]
        for name, m in methods.items():
            dvi = name.startswith("dvi")
            assert set(m) == LEVEL_KEYS | ({"mean_batch_size", "mean_accepted_length"} if dvi else set())
            assert m["tokens"] == 4 * 6  # the tiny model has no EOS: every request runs to its budget
            assert m["tokens_per_s"] > 0 and 0 < m["ttft_p50_s"] <= m["latency_p50_s"]
            # the whole set's rate; a request's own rate is lower while others share the model with it
            assert m["tokens_per_s"] == pytest.approx(m["tokens"] / m["seconds"])
            assert len(m["tokens_per_s_runs"]) == 2 and m["tokens_per_s"] == min(m["tokens_per_s_runs"])  # lower median
            if dvi:  # greedy decoding is lossless at any batch size
                assert m["identical_to_ar"] == 1.0, (n, name)
                assert 1 <= m["mean_batch_size"] <= int(n)
            else:  # padded batches may round differently; reported as measured
                assert 0 <= m["identical_to_ar"] <= 1
    assert levels["1"]["dvi_ar"]["mean_batch_size"] == 1.0
    out = capsys.readouterr().out
    assert "N=2" in out and "median of 2 runs" in out and "TTFT p50 / latency p50" in out and "dvi_spec_ngram_dynamic" in out


def test_concurrency_methods_and_levels_are_checked_before_the_model_loads(bench_args, capsys):
    assert cli.main([*bench_args, "--concurrency", "2", "--methods", "dvi_ar,hf_prompt_lookup"]) == 2
    assert "--methods: unknown ['hf_prompt_lookup']; choose from hf_batched" in capsys.readouterr().err
    assert cli.main([*bench_args, "--methods", "hf_batched"]) == 2  # batch 1 has no hf_batched
    assert cli.main([*bench_args, "--concurrency", "2", "--repeat", "0"]) == 2
    assert "--repeat must be >= 1, got 0" in capsys.readouterr().err
    for bad in ("0", "2,x"):
        with pytest.raises(SystemExit):
            cli.main([*bench_args, "--concurrency", bad])
        assert "--concurrency: expected request counts" in capsys.readouterr().err


def test_memory_methods_at_batch_1_change_no_token(bench_args, tmp_path):
    """dvi_memory (a memory of the bench's earlier answers) and dvi_memory_empty (one that stays empty, the
    memory's cost alone) are rows of the batch-1 table, token-identical to hf_ar."""
    assert cli.main([*bench_args, "--methods", "dvi_memory,dvi_memory_empty"]) == 0
    methods = {m["name"]: m for m in json.loads((tmp_path / "bench.json").read_text())["methods"]}
    assert list(methods) == ["hf_ar", "dvi_memory", "dvi_memory_empty"]
    for name in ("dvi_memory", "dvi_memory_empty"):
        assert methods[name]["identical_to_ar"] == 1.0 and methods[name]["tokens"] == 4 * 6
