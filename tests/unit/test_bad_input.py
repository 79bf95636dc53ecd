"""Bad input gets one clear line naming the problem."""
import pytest
from tiny_model import tiny_llama

from selfspec.drafter import DrafterHead, HeadConfig
from selfspec.engine import SelfSpecDecoder
from selfspec.length_policy import LengthPolicy
from selfspec.model import ModelNotFoundError, resolve_model_dir
from selfspec.split import SplitModel


@pytest.fixture(scope="module")
def decoder():
    split = SplitModel(tiny_llama(max_positions=32), 2)
    return SelfSpecDecoder(split, DrafterHead(split, HeadConfig()), LengthPolicy(2))


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt_ids=[]), r"^empty prompt"),
    (dict(prompt_ids=list(range(32))), r"^prompt has 32 tokens but the model has 32 positions; shorten it to at most 31$"),
    (dict(prompt_ids=[1, 2], temperature=-0.5), r"^temperature must be >= 0 \(0 = greedy\), got -0.5$"),
    (dict(prompt_ids=[1, 2], max_new_tokens=0), r"^max_new_tokens must be >= 1"),
])
def test_generate_rejects(decoder, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        decoder.generate(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("k", [0, 4, -1, 99])
def test_exit_layer_out_of_range(k):
    with pytest.raises(ValueError, match=r"exit layer .* out of range: must be in \[1, 3\] for this 4-layer model"):
        SplitModel(tiny_llama(), k)


def test_unknown_model_says_what_to_run(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"not found: pass a local Hugging Face model directory or one of \['smollm2-135m'\]"):
        resolve_model_dir(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_model_dir(str(tmp_path))


def test_gamma_needs_a_head():
    with pytest.raises(ValueError, match="needs a drafter head"):
        SelfSpecDecoder(SplitModel(tiny_llama(), 2), None, LengthPolicy(3))
