"""The OpenAI API as `dvi serve` speaks it: request models, response objects, and errors in OpenAI's shape.

Requests are strict. A field the engine cannot honour (`n` > 1, `logprobs`, tools, `top_p` < 1, penalties)
is a 400 naming it, and so is a field the API does not have: never silently ignored. Fields that only
describe the caller (`user`, `metadata`) are accepted.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 4  # as OpenAI: up to 4 stop sequences


class APIError(Exception):
    """An error the client gets as {"error": {"message", "type", "code", "param"}} with `status`."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers

    @property
    def type(self) -> str:
        return {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                429: "rate_limit_error"}.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, content):
        """Content parts are accepted when they are all text; images and audio are not for this model."""
        if isinstance(content, list):
            if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                   for p in content):
                raise ValueError("only text content parts ({type: text, text: ...}) are supported")
            return "".join(p["text"] for p in content)
        return content

    def turn(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content or ""}


class _Sampling(BaseModel):
    """What chat and completions requests share."""
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings")
        return stops

    @model_validator(mode="after")
    def _supported(self):
        unsupported = {"n": self.n != 1, "top_p": self.top_p != 1.0, "presence_penalty": self.presence_penalty != 0,
                       "frequency_penalty": self.frequency_penalty != 0, "logit_bias": bool(self.logit_bias)}
        for name, bad in unsupported.items():
            if bad:
                why = {"n": "one choice per request (n = 1)",
                       "top_p": "the model's full distribution (top_p = 1): speculative sampling stays exact only there"}
                raise ValueError(f"{name}: this server supports only {why.get(name, 'the default')}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only with stream: true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Any = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _chat_supported(self):
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs: not supported by this server")
        if self.tools or self.tool_choice not in (None, "none"):
            raise ValueError("tools: not supported by this server")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("response_format: only {type: text} is supported")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_supported(self):
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise ValueError("prompt: one prompt per request")
            self.prompt = self.prompt[0]
        if self.prompt in ("", []):
            raise ValueError("prompt: empty")
        for name, bad in (("echo", self.echo), ("logprobs", self.logprobs is not None),
                          ("best_of", self.best_of not in (None, 1)), ("suffix", self.suffix is not None)):
            if bad:
                raise ValueError(f"{name}: not supported by this server")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


def validation_error(err) -> APIError:
    """pydantic's first complaint as one 400 naming the field."""
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        message = f"unrecognized request argument supplied: {param}"
    elif param and not message.startswith(param.split(".")[0]):
        message = f"{param}: {message}"
    return APIError(400, message, "invalid_request", param)


def completion_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def response_object(chat: bool, rid: str, model: str, text: str, result: dict) -> dict:
    """A whole answer; `result` is the replica's record of the request (finish reason, token counts, dvi's own)."""
    finish = result["finish_reason"]
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
              if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(result), "dvi": dvi_fields(result)}


def chunk_object(chat: bool, rid: str, model: str, text: str | None, finish: str | None = None,
                 role: bool = False) -> dict:
    if chat:
        delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}


def usage(result: dict) -> dict:
    prompt, completion = result["prompt_tokens"], result["tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def dvi_fields(result: dict) -> dict:
    """dvi's own numbers for one request, in a response field the openai client ignores."""
    return {"mean_accepted_length": result.get("mean_accepted_length"), "drafted": result.get("drafted"),
            "accepted": result.get("accepted"), "head_version": result.get("head_version"),
            "replica": result.get("actor_id")}
