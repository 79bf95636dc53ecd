"""Where a trace's text comes from: Spec-Bench-format files, HumanEval, the built-in prompts, or a plain
prompt list. Each source yields conversations tagged by workload; `WorkloadStream` turns one workload's
conversations into successive requests, turn by turn.

The files are read by `selfspec.prompts` (one Spec-Bench parser for the whole project).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field

from selfspec.config import FrozenStrict


@dataclass(frozen=True)
class Conversation:
    source_id: str  # e.g. "spec_bench:81", "humaneval:HumanEval/3", "prompts:mine.txt:12"
    turns: tuple[str, ...]  # user turns; the answers come from the served model at replay time


class SpecBenchSource(FrozenStrict):
    """A Spec-Bench-format JSONL file, by default (or as `path: spec-bench`) Spec-Bench's own questions
    (DVI_SPEC_BENCH, else the copy `dvi data fetch spec-bench` downloads); the workload is each question's
    category unless `workload` is set."""
    kind: Literal["spec_bench"] = Field(description="selects this source")
    path: str = Field("spec-bench", description="a Spec-Bench-format JSONL file; spec-bench: Spec-Bench's own "
                                                "questions")
    workload: str | None = Field(None, description="workload of every question; null: each question's category")
    categories: list[str] | None = Field(None, description="keep only these categories; null: all")
    limit: int | None = Field(None, ge=1, description="the first N questions of the file (the rest stay held out); "
                                                      "null: all")

    def load(self) -> dict[str, list[Conversation]]:
        from selfspec.prompts import spec_bench_prompts

        prompts = spec_bench_prompts(self.path)[:self.limit]
        if self.categories is not None:
            missing = set(self.categories) - {p.category for p in prompts}
            if missing:
                raise ValueError(f"{self.path} has no questions in categories {sorted(missing)}")
            prompts = [p for p in prompts if p.category in self.categories]
        return _group([(self.workload or p.category, Conversation(f"spec_bench:{p.id}", p.turns)) for p in prompts])


class HumanEvalSource(FrozenStrict):
    """HumanEval's problems, as one workload."""
    kind: Literal["humaneval"] = Field(description="selects this source")
    workload: str = Field("code", description="workload of every problem")

    def load(self) -> dict[str, list[Conversation]]:
        from selfspec.prompts import humaneval_prompts

        return {self.workload: [Conversation(f"humaneval:{p.id}", p.turns) for p in humaneval_prompts()]}


class BuiltinSource(FrozenStrict):
    """The project's built-in prompts (`selfspec.prompts.BUILTIN`), one workload per category."""
    kind: Literal["builtin"] = Field(description="selects this source")
    workload: str | None = Field(None, description="workload of every prompt; null: each prompt's category")
    limit: int | None = Field(None, ge=1, description="the first N prompts (the rest stay held out); null: all")

    def load(self) -> dict[str, list[Conversation]]:
        from selfspec.prompts import builtin_prompts

        return _group([(self.workload or p.category, Conversation(f"builtin:{p.id}", p.turns))
                       for p in builtin_prompts()[:self.limit]])


class PromptsSource(FrozenStrict):
    """A text file with one prompt per line (blank lines skipped); the workload defaults to the file's stem."""
    kind: Literal["prompts"] = Field(description="selects this source")
    path: str = Field(description="the text file, one prompt per line")
    workload: str | None = Field(None, description="workload of every prompt; null: the file's stem")

    def load(self) -> dict[str, list[Conversation]]:
        path = Path(self.path)
        if not path.exists():
            raise FileNotFoundError(f"prompt list {path} not found")
        conversations = [Conversation(f"prompts:{path.name}:{no}", (line.strip(),))
                         for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
        if not conversations:
            raise ValueError(f"prompt list {path} has no prompts")
        return {self.workload or path.stem: conversations}


SourceSpec = Annotated[Union[SpecBenchSource, HumanEvalSource, BuiltinSource, PromptsSource], Field(discriminator="kind")]


def _group(tagged: list[tuple[str, Conversation]]) -> dict[str, list[Conversation]]:
    groups: dict[str, list[Conversation]] = {}
    for workload, conversation in tagged:
        groups.setdefault(workload, []).append(conversation)
    return groups


def load_workloads(sources: list) -> dict[str, list[Conversation]]:
    """workload -> its conversations in source order; sources sharing a workload tag are concatenated."""
    workloads: dict[str, list[Conversation]] = {}
    for source in sources:
        for workload, conversations in source.load().items():
            workloads.setdefault(workload, []).extend(conversations)
    return workloads


@dataclass(frozen=True)
class RequestText:
    """One request's text before it has a time and an id."""
    messages: list[dict]
    conversation_id: str | None
    source: str


class WorkloadStream:
    """A workload's requests in order: every turn of a conversation, then the next conversation; after the
    last conversation it starts over (a repeat gets a new conversation_id, `#1`, `#2`, ...)."""

    def __init__(self, conversations: list[Conversation]):
        if not conversations:
            raise ValueError("a workload needs at least one conversation")
        self.conversations = conversations
        self._conversation, self._turn, self.repeats = 0, 0, 0

    def next(self) -> RequestText:
        conversation = self.conversations[self._conversation]
        turn = self._turn
        messages = []
        for earlier in conversation.turns[:turn]:
            messages += [{"role": "user", "content": earlier}, {"role": "assistant", "content": None}]
        messages.append({"role": "user", "content": conversation.turns[turn]})
        multi_turn = len(conversation.turns) > 1
        text = RequestText(messages, f"{conversation.source_id}#{self.repeats}" if multi_turn else None,
                           conversation.source_id)
        self._turn += 1
        if self._turn == len(conversation.turns):
            self._conversation, self._turn = self._conversation + 1, 0
            if self._conversation == len(self.conversations):
                self._conversation, self.repeats = 0, self.repeats + 1
        return text
