"""A drafter head has one serialised form and one fit rule: head_weights -> (arrays, meta) is what a
published blob carries and what head.safetensors + head.json hold; HeadSpec.problem decides whether weights
fit, for the weight store (a pulled blob: tests/integration/test_buffer_weights.py) and the loader
(head_from_weights, load_head) alike, in the same words."""
import json
import re

import numpy as np
import pytest
import torch
from tiny_model import tiny_llama

from selfspec.config import HeadConfig
from selfspec.drafter import DrafterHead, head_from_weights, head_weights, load_head, save_head
from selfspec.head_format import HeadMismatch, HeadSpec, read_head, write_head
from selfspec.split import SplitModel

K = 2
HEAD = HeadConfig(adapter_hidden=8, lora_rank=2, draft_vocab=32)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=1)


@pytest.fixture(scope="module")
def head(model):
    torch.manual_seed(0)
    head = DrafterHead(SplitModel(model, K), HEAD)
    with torch.no_grad():
        head.proj.lora_B.default.weight.normal_()  # not its zero initialisation: a round trip shows
    return head


def _mismatch(arrays: dict, meta: dict, kind: str) -> tuple[dict, dict]:
    arrays, meta = dict(arrays), dict(meta)
    if kind == "shape":
        arrays["proj.lora_B.default.weight"] = np.zeros((32, 3))
    elif kind == "dtype":
        arrays["vocab_ids"] = arrays["vocab_ids"].astype(np.int32)
    elif kind == "exit layer":
        meta["exit_layer"] = K + 1
    elif kind == "base model":
        meta["base_model"] = "another-model"
    elif kind == "parameters":
        del arrays["norm.weight"]
    return arrays, meta


PROBLEMS = {"shape": "proj.lora_B.default.weight: shape (32, 3), expected (32, 2)",
            "dtype": "vocab_ids: dtype int32, expected int64",
            "exit layer": f"exit layer {K + 1}, expected {K}",
            "base model": "base model 'another-model', expected 'tiny'",
            "parameters": "parameters missing ['norm.weight'], unexpected []"}


@pytest.mark.parametrize("kind", PROBLEMS)
def test_one_rule_refuses_a_head_that_does_not_fit_for_the_store_and_the_loader(model, head, kind):
    arrays, meta = head_weights(head)
    meta = meta | {"base_model": "tiny"}
    spec = HeadSpec.of(arrays, meta, base_model="tiny")  # what an actor's WeightStore checks a pulled blob with
    assert spec.problem(arrays, meta) is None
    bad_arrays, bad_meta = _mismatch(arrays, meta, kind)
    assert spec.problem(bad_arrays, bad_meta) == PROBLEMS[kind]
    if kind == "base model":
        return  # a split does not know its model's name: only the store checks it
    with pytest.raises(HeadMismatch, match=re.escape(f"the head's weights do not fit: {PROBLEMS[kind]}")):
        head_from_weights(SplitModel(model, K), bad_arrays, bad_meta)


def test_weights_without_an_exit_layer_are_taken_at_the_splits(model, head):
    arrays, meta = head_weights(head)
    del meta["exit_layer"]
    assert HeadSpec.of(*head_weights(head)).problem(arrays, meta) is None
    loaded = head_from_weights(SplitModel(model, K), arrays, meta)
    torch.testing.assert_close(loaded.proj.lora_B.default.weight, head.proj.lora_B.default.weight, rtol=0, atol=0)


def test_the_loader_takes_weights_at_its_models_float_precision(model, head):
    arrays, meta = head_weights(head)  # float64: the tiny model's precision
    split = SplitModel(tiny_llama(seed=1).float(), K)
    loaded = head_from_weights(split, arrays, meta)
    assert loaded.proj.lora_B.default.weight.dtype == torch.float32
    assert HeadSpec.of(*head_weights(loaded)).problem(arrays, meta) == \
        "adapter.0.weight: dtype float64, expected float32"  # the store takes a blob as published, or not at all


def test_disk_holds_exactly_the_published_weights(model, head, tmp_path):
    arrays, meta = head_weights(head)
    assert arrays["vocab_ids"].dtype == np.int64 and meta == {"head": HEAD.model_dump(), "exit_layer": K}
    save_head(head, tmp_path / "h", {"base_model": "tiny", "version": 3})
    on_disk, disk_meta = read_head(tmp_path / "h")
    assert disk_meta == meta | {"base_model": "tiny", "version": 3}
    assert on_disk.keys() == arrays.keys()
    for name, a in arrays.items():
        assert on_disk[name].dtype == a.dtype and np.array_equal(on_disk[name], a), name
    # the head.json layout users' runs hold: the head config, the exit layer, then the writer's meta
    assert list(json.loads((tmp_path / "h" / "head.json").read_text())) == ["head", "exit_layer", "base_model", "version"]
    split, loaded, rest = load_head(model, tmp_path / "h" / "head.json")
    assert split.exit_layer == K and rest == {"base_model": "tiny", "version": 3}
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), head(x), rtol=0, atol=0)


def test_a_saved_head_that_does_not_fit_is_refused_by_the_loader(model, head, tmp_path):
    arrays, meta = _mismatch(*head_weights(head), "shape")
    write_head(tmp_path, arrays, meta)
    with pytest.raises(HeadMismatch, match=r"do not fit: proj.lora_B.default.weight: shape \(32, 3\)"):
        load_head(model, tmp_path)


def test_a_head_saved_with_its_exit_layer_in_its_config_still_loads(model, head, tmp_path):
    arrays, meta = head_weights(head)
    write_head(tmp_path, arrays, {"head": meta["head"] | {"exit_layer": K}, "base_model": "tiny"})
    split, loaded, rest = load_head(model, tmp_path)
    assert split.exit_layer == K and loaded.config == HEAD and rest == {"base_model": "tiny"}
