"""Spec-Bench evaluation: one dvi method against Hugging Face greedy decoding, per category and overall.

Each question is answered turn by turn under the chat template, as Spec-Bench does; a later turn's
history holds the reference's (hf_ar's) answers, so every method sees the same prompt (all methods are
lossless: where they are token-identical to hf_ar, which `identical_to_ar` checks, the answers agree).
The runs are dvi bench's: the same runners, interleaved prompt by prompt with the order rotated.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dvi.run.files import learner_dir
from dvi.studies.bench import MethodRuns, machine_info, make_runners, method_summary, run_prompt, warm_up
from learner.publish import head_dir, published_heads
from selfspec.loading import ModelParts
from selfspec.prompts import Prompt, messages_ids

REFERENCE = "hf_ar"
# the numbers reported per category and overall (`method_summary` computes more; these are what a table shows)
STATS = ("turns", "tokens", "speedup", "mean_accepted_length", "acceptance_rate", "identical_to_ar",
         "identical_turns", "tokens_per_s", "ar_tokens_per_s")


def run_head_dir(run_dir: str | Path, version: str | int = "latest") -> Path:
    """The head directory of version N (or the highest, `latest`) published in a run directory."""
    versions = published_heads(learner_dir(run_dir))
    if not versions:
        raise FileNotFoundError(f"{run_dir}: no published heads (expected {head_dir(learner_dir(run_dir), 1)}/head.json ...)")
    if str(version) == "latest":
        return versions[max(versions)]
    try:
        n = int(version)
    except ValueError:
        raise ValueError(f"--version {version!r}: give a number or `latest`") from None
    if n not in versions:
        raise FileNotFoundError(f"{run_dir}: no head version {n}; published: {', '.join(map(str, versions))}")
    return versions[n]


def select_questions(questions: list[Prompt], categories: list[str] | None = None,
                     n_per_category: int | None = None) -> list[Prompt]:
    """Questions of the given categories (all if None), at most n of each, in the file's interleaved order."""
    known = list(dict.fromkeys(q.category for q in questions))
    unknown = [c for c in categories or () if c not in known]
    if unknown:
        raise ValueError(f"--categories: unknown {', '.join(unknown)}; the file has {', '.join(known)}")
    taken: dict[str, int] = {}
    out = []
    for q in questions:
        if categories and q.category not in categories:
            continue
        if n_per_category is not None and taken.get(q.category, 0) >= n_per_category:
            continue
        taken[q.category] = taken.get(q.category, 0) + 1
        out.append(q)
    return out


def conversation(turns: tuple[str, ...] | list[str], answers: list[str]) -> list[dict]:
    """Chat messages for the last of `turns`: each earlier turn followed by its answer."""
    assert len(answers) == len(turns) - 1
    messages = []
    for turn, answer in zip(turns, [*answers, None]):
        messages.append({"role": "user", "content": turn})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


@dataclass
class Turn:
    question_id: str
    category: str
    index: int  # 0 for a question's first turn
    ids: list[int]  # the rendered prompt, history included


@dataclass(frozen=True)
class EvalSpec:
    """What an evaluation runs: one dvi method against hf_ar, on a question file."""
    method: str
    max_new_tokens: int
    gamma: int
    source: str  # the question file, recorded in the report


def run_eval(parts: ModelParts, questions: list[Prompt], spec: EvalSpec,
             progress: bool = True) -> tuple[list[Turn], dict[str, MethodRuns]]:
    """Every turn of every question through hf_ar and `method` (dvi bench's runners); each method's
    runs are in turn order."""
    from tqdm import tqdm

    method = spec.method
    runners = make_runners(parts, spec.max_new_tokens, spec.gamma, (method,))
    runs = {name: MethodRuns(name) for name in runners}
    turns: list[Turn] = []
    tokenizer = parts.tokenizer
    with tqdm(total=sum(len(q.turns) for q in questions), desc="eval", unit="turn", disable=not progress) as bar:
        for q in questions:
            answers: list[str] = []
            for j in range(len(q.turns)):
                ids = messages_ids(tokenizer, conversation(q.turns[: j + 1], answers))
                if not turns:
                    warm_up(runners, ids)
                out = run_prompt(runners, runs, ids, len(turns), bar, parts.split.device)
                turns.append(Turn(q.id, q.category, j, ids))
                answers.append(tokenizer.decode(out[REFERENCE], skip_special_tokens=True).strip())
                bar.update()
    return turns, runs


def summarise(turns: list[Turn], runs: dict[str, MethodRuns], method: str, model=None) -> dict:
    """{"overall": stats, "categories": {name: stats}} of `method` against hf_ar (dvi bench's formulas);
    with `model`, the overall stats also say where outputs that differ from hf_ar depart from it."""
    def stats(keep: list[int], model=None) -> dict:
        ref, got = runs[REFERENCE].subset(keep), runs[method].subset(keep)
        full = method_summary(got, ref, model, [turns[i].ids for i in keep])
        full.update(turns=len(keep), ar_tokens_per_s=ref.tokens_per_s,
                    identical_turns=sum(a == b for a, b in zip(got.tokens, ref.tokens)))
        out = {k: full[k] for k in STATS}
        if "divergences" in full:
            out["divergences"] = full["divergences"]
        return out

    categories = list(dict.fromkeys(t.category for t in turns))
    return {"overall": stats(list(range(len(turns))), model),
            "categories": {c: stats([i for i, t in enumerate(turns) if t.category == c]) for c in categories}}


def report(parts: ModelParts, questions: list[Prompt], turns: list[Turn], runs: dict[str, MethodRuns],
           spec: EvalSpec) -> dict:
    """The JSON report: run metadata, then the stats overall and per category."""
    method = spec.method
    return {
        "model": parts.meta.get("base_model") or getattr(parts.model.config, "_name_or_path", "") or "unknown",
        "head_path": parts.meta.get("path"), "exit_layer": parts.split.exit_layer,
        "method": method, "methods": list(runs), **machine_info(parts),
        "questions_file": spec.source, "max_new_tokens": spec.max_new_tokens, "gamma": spec.gamma,
        "n": {"questions": len(questions), "turns": len(turns)},
        **summarise(turns, runs, method, parts.model),
        "turns": [{"question_id": t.question_id, "category": t.category, "turn": t.index, "prompt_tokens": len(t.ids),
                   "new_tokens": len(runs[method].tokens[i]),
                   "seconds": {name: r.seconds[i] for name, r in runs.items()},
                   "identical_to_ar": runs[method].tokens[i] == runs[REFERENCE].tokens[i]} for i, t in enumerate(turns)],
    }

