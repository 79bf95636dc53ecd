"""`dvi eval`: the Spec-Bench loader with a two-turn question, the history of a later turn, the aggregation
per category (known runs in, known numbers and table out), a run directory's head versions, and the
command end to end on a tiny model saved with a byte-level tokenizer."""
from __future__ import annotations

import json

import pytest
import torch

from dvi import cli
from dvi.cli.eval import print_table
from dvi.studies.bench import MethodRuns
from dvi.studies.eval import Turn, conversation, run_head_dir, select_questions, summarise
from selfspec.drafter import DrafterHead, HeadConfig, save_head
from selfspec.request import DecodeResult, RoundStats
from selfspec.prompts import messages_ids, spec_bench_prompts
from selfspec.split import SplitModel
from tiny_model import byte_tokenizer, tiny_llama

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now make it rhyme."]},
    {"question_id": 82, "category": "writing", "turns": ["Write a limerick."]},
    {"question_id": 91, "category": "coding", "turns": ["Reverse a list."]},
    {"question_id": 92, "category": "coding", "turns": ["Sort a list.", "Now in reverse."]},
    {"question_id": 101, "category": "qa", "turns": ["Why is the sky blue?"]},
]
HEAD = HeadConfig(adapter_hidden=32, lora_rank=4)


class TagTokenizer:
    """Bytes as ids under a made-up chat template."""
    chat_template = "tags"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, return_dict=True) -> dict:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return {"input_ids": list(text.encode())}


def write_questions(path, rows=QUESTIONS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loader_keeps_turns_and_a_later_turn_carries_the_first_answer(tmp_path):
    questions = spec_bench_prompts(write_questions(tmp_path / "q.jsonl"))
    assert [q.id for q in questions] == ["81", "91", "101", "82", "92"]  # categories interleaved
    first = questions[0]
    assert first.category == "writing" and first.turns == ("Write a haiku.", "Now make it rhyme.")

    assert [q.id for q in select_questions(questions, ["coding", "writing"], 1)] == ["81", "91"]
    assert [q.id for q in select_questions(questions, n_per_category=1)] == ["81", "91", "101"]
    with pytest.raises(ValueError, match="unknown math.*writing, coding, qa"):
        select_questions(questions, ["math"])

    assert conversation(first.turns[:1], []) == [{"role": "user", "content": "Write a haiku."}]
    messages = conversation(first.turns, ["An old silent pond"])
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    text = bytes(messages_ids(TagTokenizer(), messages)).decode()
    assert text == "<user>Write a haiku.<assistant>An old silent pond<user>Now make it rhyme.<assistant>"


def result(accepted: list[int], drafted: int) -> DecodeResult:
    return DecodeResult([0], [RoundStats(drafted, a, 0.1, 0.2) for a in accepted], t_prefill=0.1, t_total=1.0)


def test_summary_per_category_and_overall(capsys):
    turns = [Turn("1", "writing", 0, [1]), Turn("1", "writing", 1, [2]), Turn("2", "coding", 0, [3])]
    ar = MethodRuns("hf_ar", [[1] * 10, [2] * 10, [3] * 20], [1.0, 1.0, 2.0])  # 10 tok/s throughout
    dvi = MethodRuns("dvi_spec", [[1] * 10, [2] * 10, [3] * 19 + [4]], [0.5, 0.5, 0.5],
                     [result([4, 2], 4), result([0, 0], 4), result([4, 4, 4], 4)])
    summary = summarise(turns, {"hf_ar": ar, "dvi_spec": dvi}, "dvi_spec")

    writing, coding, overall = summary["categories"]["writing"], summary["categories"]["coding"], summary["overall"]
    assert list(summary["categories"]) == ["writing", "coding"]
    assert writing["turns"] == 2 and writing["speedup"] == pytest.approx(2.0)  # 20 tok/s vs 10
    assert writing["acceptance_rate"] == pytest.approx(6 / 16)
    assert writing["mean_accepted_length"] == pytest.approx((5 + 3 + 1 + 1) / 4)  # accepted + the verifier's token
    assert writing["identical_turns"] == 2 and writing["identical_to_ar"] == 1.0
    assert coding["speedup"] == pytest.approx(4.0) and coding["acceptance_rate"] == 1.0
    assert coding["mean_accepted_length"] == 5.0 and coding["identical_turns"] == 0
    assert overall["turns"] == 3 and overall["speedup"] == pytest.approx((40 / 1.5) / 10)
    assert overall["acceptance_rate"] == pytest.approx(18 / 28)
    assert overall["mean_accepted_length"] == pytest.approx((10 + 15) / 7)
    assert overall["identical_turns"] == 2 and overall["identical_to_ar"] == pytest.approx(2 / 3)

    print_table({"method": "dvi_spec", "model": "tiny", "machine": "test", "n": {"questions": 2, "turns": 3},
                 "max_new_tokens": 20, "exit_layer": 2, **summary})
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["│", "writing", "│", "2", "│", "2.00x", "│", "2.50", "│", "0.38", "│", "2/2", "│"] in rows
    assert ["│", "coding", "│", "1", "│", "4.00x", "│", "5.00", "│", "1.00", "│", "0/1", "│"] in rows
    assert ["│", "overall", "│", "3", "│", "2.67x", "│", "3.57", "│", "0.64", "│", "2/3", "│"] in rows


def publish(root, versions, model):
    split = SplitModel(model, 2)
    head = DrafterHead(split, HEAD)
    for n in versions:
        save_head(head, root / "learner" / "heads" / f"v{n:04d}", {"base_model": "tiny", "version": n})


def test_run_dir_versions(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="no published heads"):
        run_head_dir(run, "latest")
    publish(run, [1, 2, 10], tiny_llama(seed=3))
    (run / "learner" / "heads" / "v0011").mkdir()  # being written: no head.json yet
    assert run_head_dir(run, "latest") == run / "learner" / "heads" / "v0010"
    assert run_head_dir(run, "2") == run_head_dir(run, 2) == run / "learner" / "heads" / "v0002"
    with pytest.raises(FileNotFoundError, match="no head version 3; published: 1, 2, 10"):
        run_head_dir(run, 3)
    with pytest.raises(ValueError, match="number or `latest`"):
        run_head_dir(run, "newest")


def test_eval_command_end_to_end(tmp_path, monkeypatch, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a shared machine: a second thread only contends
    try:
        model = tiny_llama(seed=3, max_positions=256)
        model.save_pretrained(tmp_path / "model")
        byte_tokenizer().save_pretrained(tmp_path / "model")
        publish(tmp_path / "run", [1, 2], model)
        rows = [{"question_id": 1, "category": "writing", "turns": ["Hi", "More"]},
                {"question_id": 2, "category": "coding", "turns": ["Sort"]},
                {"question_id": 3, "category": "coding", "turns": ["Skipped"]},
                {"question_id": 4, "category": "qa", "turns": ["Skipped"]}]
        questions = write_questions(tmp_path / "q.jsonl", rows)
        monkeypatch.setattr(cli, "COMMANDS", {"eval": "dvi.cli.eval"})
        out = tmp_path / "eval.json"
        args = ["eval", "--model", str(tmp_path / "model"), "--run", str(tmp_path / "run"), "--questions", str(questions),
                "--categories", "writing,coding", "--n-per-category", "1", "--max-new-tokens", "8", "--method", "dvi_spec",
                "--out", str(out)]
        assert cli.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert report["head_path"].endswith("v0002") and report["methods"] == ["hf_ar", "dvi_spec"]
    assert report["versions"]["transformers"]
    assert report["n"] == {"questions": 2, "turns": 3} and report["max_new_tokens"] == 8
    assert list(report["categories"]) == ["writing", "coding"]
    for stats in [report["overall"], *report["categories"].values()]:
        assert stats["speedup"] > 0 and stats["mean_accepted_length"] >= 1 and 0 <= stats["acceptance_rate"] <= 1
        assert stats["identical_to_ar"] == 1.0  # lossless
    assert report["overall"]["tokens"] == 3 * 8 and report["overall"]["divergences"] == []
    assert [(t["question_id"], t["turn"]) for t in report["turns"]] == [("1", 0), ("1", 1), ("2", 0)]
    # the second turn's prompt holds the first turn and its answer
    assert report["turns"][1]["prompt_tokens"] > report["turns"][0]["prompt_tokens"] + len("More")
    assert "overall" in capsys.readouterr().out

    assert cli.main([*args[:-2], "--version", "7", "--out", str(out)]) == 2
    assert "no head version 7; published: 1, 2" in capsys.readouterr().err
    assert cli.main(["eval", "--questions", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl not found" in capsys.readouterr().err
