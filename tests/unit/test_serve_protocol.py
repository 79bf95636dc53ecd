"""`dvi serve`'s request checks and its text streaming, without a server (tests/integration/test_serve.py
runs the real one)."""
import pytest
from pydantic import ValidationError

from dvi.serve import protocol as api
from dvi.serve.text import TextStream


class BytesTokenizer:
    """Token i is byte i (a multi-byte UTF-8 character spans tokens, as in a BPE vocabulary); 256 is EOS."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def ids(text: str) -> list[int]:
    return list(text.encode())


def stream(text_ids: list[int], stops: list[str], chunk: int) -> tuple[list[str], TextStream]:
    s = TextStream(BytesTokenizer(), stops)
    out = []
    for i in range(0, len(text_ids), chunk):
        out.append(s.add(text_ids[i:i + chunk]))
        if s.stopped:
            break
    out.append(s.finish())
    return out, s


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_streamed_text_joins_to_the_whole_and_never_splits_a_character(chunk):
    text = "héllo wörld ✓ done"
    parts, s = stream(ids(text), [], chunk)
    assert "".join(parts) == text and not s.stopped
    assert all("\ufffd" not in p for p in parts), parts


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_a_stop_sequence_ends_the_text_before_it_and_is_never_sent(chunk):
    parts, s = stream(ids("one two\n\nthree"), ["\n\n", "zzz"], chunk)
    assert "".join(parts) == "one two" and s.stopped
    # a tail that only begins a stop sequence is held back, then sent once it did not become one
    parts, s = stream(ids("ab\ncd"), ["\n\n"], 1)
    assert "".join(parts) == "ab\ncd" and not s.stopped and parts[:4] == ["a", "b", "", "\nc"]


def chat(**fields) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize("fields, param, words", [
    ({"n": 2}, None, "n: this server supports only one choice"),
    ({"top_p": 0.9}, None, "top_p: this server supports only the model's full distribution"),
    ({"logprobs": True}, None, "logprobs: not supported"),
    ({"tools": [{"type": "function"}]}, None, "tools: not supported"),
    ({"frequency_penalty": 0.5}, None, "frequency_penalty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"temperature": 3}, "temperature", "less than or equal to 2"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"best_guess": 1}, "best_guess", "unrecognized request argument supplied: best_guess"),
    ({"messages": []}, "messages", "at least 1"),
    ({"stream_options": {"include_usage": True}}, None, "stream_options: only with stream: true"),
])
def test_unsupported_or_bad_fields_are_a_400_naming_them(fields, param, words):
    with pytest.raises(ValidationError) as err:
        api.ChatRequest.model_validate(chat(**fields))
    error = api.validation_error(err.value)
    assert error.status == 400 and words in error.message, error.message
    if param:
        assert error.param == param
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_defaults_and_benign_fields_are_accepted():
    req = api.ChatRequest.model_validate(chat(n=1, top_p=1, logprobs=False, user="u", stop="###",
                                              max_completion_tokens=5, stream=True,
                                              stream_options={"include_usage": True}))
    assert req.stop == ["###"] and req.token_limit == 5 and req.include_usage
    completion = api.CompletionRequest.model_validate({"model": "m", "prompt": ["one prompt"]})
    assert completion.prompt == "one prompt" and completion.token_limit == 16  # OpenAI's default
    with pytest.raises(ValidationError, match="one prompt per request"):
        api.CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]})
    with pytest.raises(ValidationError, match="echo"):
        api.CompletionRequest.model_validate({"model": "m", "prompt": "a", "echo": True})
