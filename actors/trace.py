"""The traffic trace: JSONL, one request per line, and the typed record each line must be.

A line:

    {"arrival_s": 1.25, "request_id": "r00003", "workload": "math", "messages": [...],
     "max_new_tokens": 128, "temperature": 0.0, "conversation_id": "spec_bench:81#0", "source": "spec_bench:81"}

- `arrival_s`: seconds from the start of the replay (a replay may rescale or replace them).
- `messages` (chat, rendered with the model's chat template) or `prompt` (plain text), never both.
- Multi-turn: a later turn of a conversation carries the earlier turns, and each earlier *answer* is an
  assistant placeholder `{"role": "assistant", "content": null}`. The answer does not exist when the
  trace is written (it is whatever the served model says), so whoever serves turn k fills the k
  placeholders with its own answers to turns 0..k-1 of the same `conversation_id` (`ConversationMemory`).
  The replayer sends turn k only after turn k-1 completed, to the same actor.
- `source`: where the text came from (`humaneval:HumanEval/3`), for analysis; optional.

`read_trace` never stops at a bad line: it returns the good requests and one `TraceLineError` per bad
line, so a run reports those per request and goes on.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from selfspec.config import FrozenStrict


# A misspelt field in a hand-written trace is an error naming it, not a silently ignored key.
class Message(FrozenStrict):
    role: Literal["system", "user", "assistant"]
    content: str | None  # None only as an assistant placeholder: "the served model's answer to the earlier turn"

    @model_validator(mode="after")
    def _placeholder_is_an_answer(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content null is only allowed for an assistant placeholder, not role {self.role}")
        return self


class TraceRequest(FrozenStrict):
    arrival_s: float = Field(ge=0, allow_inf_nan=False)
    request_id: str = Field(min_length=1)
    workload: str = Field(min_length=1)
    messages: list[Message] | None = None
    prompt: str | None = None
    max_new_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0, allow_inf_nan=False)
    conversation_id: str | None = None
    source: str | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        if self.messages is not None:
            if not self.messages or self.messages[-1].role != "user":
                raise ValueError("messages must end with a user message (the model writes the next one)")
            if self.turn > 0 and self.conversation_id is None:
                raise ValueError("assistant placeholders (content null) need a conversation_id to fill them from")
        return self

    @property
    def turn(self) -> int:
        """0 for a first turn; k when the messages hold k earlier answers to fill in."""
        return sum(m.content is None for m in self.messages or ())

    def to_dict(self) -> dict:
        """The trace line's object, also what an actor receives: top-level None fields left out, while a
        placeholder keeps its explicit `content: null`."""
        return {key: value for key, value in self.model_dump().items() if value is not None}


@dataclass(frozen=True)
class TraceLineError:
    path: str
    line: int
    request_id: str | None  # when the bad line still named one, so the run can report it per request
    problem: str

    def __str__(self) -> str:
        named = f" (request {self.request_id})" if self.request_id else ""
        return f"{self.path}:{self.line}{named}: {self.problem}"


def _one_line(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in err.errors())


def read_trace(path: str | Path) -> tuple[list[TraceRequest], list[TraceLineError]]:
    """The good requests in file order, and one error per bad line (blank lines are skipped)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace file {path} not found (write one with `dvi trace make`)")
    requests: list[TraceRequest] = []
    errors: list[TraceLineError] = []
    seen_ids: set[str] = set()
    seen_turns: set[tuple[str, int]] = set()
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            errors.append(TraceLineError(str(path), line_no, None, f"not JSON ({err.msg} at column {err.colno})"))
            continue
        if not isinstance(row, dict):
            errors.append(TraceLineError(str(path), line_no, None, f"expected a JSON object, got {type(row).__name__}"))
            continue
        named = row.get("request_id") if isinstance(row.get("request_id"), str) else None
        try:
            request = TraceRequest.model_validate(row)
        except ValidationError as err:
            errors.append(TraceLineError(str(path), line_no, named, _one_line(err)))
            continue
        if request.request_id in seen_ids:
            errors.append(TraceLineError(str(path), line_no, None, f"duplicate request_id {request.request_id}"))
            continue
        turn_key = (request.conversation_id, request.turn)
        if request.conversation_id is not None and turn_key in seen_turns:
            errors.append(TraceLineError(str(path), line_no, named,
                                         f"conversation {request.conversation_id} already has a turn {request.turn}"))
            continue
        seen_ids.add(request.request_id)
        seen_turns.add(turn_key)
        requests.append(request)
    return requests, errors


def write_trace(requests: list[TraceRequest], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps(r.to_dict(), ensure_ascii=False) for r in requests)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


class ConversationMemory:
    """The answers an actor gave so far, per conversation, to fill a later turn's assistant placeholders.

    For the generation actor: `messages_for(request)` before decoding, `remember(request, answer)` after.
    Bounded: the oldest conversations are forgotten first (a replay moves on from them).
    """

    def __init__(self, max_conversations: int = 10_000):
        self.max_conversations = max_conversations
        self._answers: OrderedDict[str, dict[int, str]] = OrderedDict()

    def messages_for(self, request: dict) -> list[dict]:
        """The request's messages with placeholder k replaced by this actor's answer to turn k."""
        if request.get("messages") is None:
            raise ValueError(f"request {request['request_id']} has a prompt, not chat messages")
        answers = self._answers.get(request.get("conversation_id"), {})
        filled, turn = [], 0
        for message in request["messages"]:
            if message["content"] is None:
                if turn not in answers:
                    raise ValueError(f"request {request['request_id']}: no answer to turn {turn} of conversation "
                                     f"{request.get('conversation_id')} on this actor (restarted, or the turn failed)")
                message = {"role": "assistant", "content": answers[turn]}
                turn += 1
            filled.append(dict(message))
        return filled

    def remember(self, request: dict, answer: str) -> None:
        conversation = request.get("conversation_id")
        if conversation is None:
            return  # a single-turn request: nothing will ask for its answer
        turn = sum(m["content"] is None for m in request.get("messages") or ())
        self._answers.setdefault(conversation, {})[turn] = answer
        self._answers.move_to_end(conversation)
        while len(self._answers) > self.max_conversations:
            self._answers.popitem(last=False)
