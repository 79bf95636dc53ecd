"""Weight store against a real redis-server: atomic publish, pull only when newer, refusals counted."""
from __future__ import annotations

import numpy as np
import pytest

from buffer.keys import RunKeys
from buffer.weights import WeightsRefused, WeightStore
from selfspec.head_format import HeadSpec

BASE = "SmolLM2-135M-Instruct"


def _head(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"adapter.up": rng.standard_normal((16, 32), np.float32),
            "lora_B": rng.standard_normal((64, 4), np.float32)}


def test_publish_then_pull_only_when_newer(redis_client):
    learner, actor = WeightStore(redis_client, "run"), WeightStore(redis_client, "run", expected=HeadSpec.of(_head(), {}, BASE))
    assert actor.latest_version() is None and actor.pull_if_newer(None) is None
    learner.publish(1, _head(1), {"base_model": BASE, "step": 100})
    version, arrays, meta = actor.pull_if_newer(None)
    assert version == 1 and meta == {"base_model": BASE, "step": 100}
    assert all(np.array_equal(arrays[k], v) for k, v in _head(1).items())
    assert actor.pull_if_newer(1) is None
    learner.publish(5, _head(5), {"base_model": BASE})
    assert actor.latest_version() == 5 and actor.pull_if_newer(1)[0] == 5
    with pytest.raises(ValueError, match="not newer than the published v5"):
        learner.publish(5, _head(), {"base_model": BASE})


def test_only_the_last_versions_are_kept(redis_client):
    store = WeightStore(redis_client, "run", keep_last=2)
    for version in range(1, 6):
        store.publish(version, _head(version), {"base_model": BASE})
    keys = RunKeys("run")
    assert [redis_client.exists(keys.weights(v)) for v in range(1, 6)] == [0, 0, 0, 1, 1]
    assert int(redis_client.get(keys.weights_latest)) == 5


def _mismatch(kind: str) -> tuple[dict, dict]:
    arrays, meta = _head(), {"base_model": BASE}
    if kind == "shape":
        arrays["lora_B"] = np.zeros((64, 8), np.float32)
    elif kind == "dtype":
        arrays["lora_B"] = arrays["lora_B"].astype(np.float16)
    elif kind == "base model":
        meta = {"base_model": "Llama-2-7b"}
    elif kind == "exit layer":
        meta = {"base_model": BASE, "exit_layer": 6}
    elif kind == "parameters":
        arrays["extra"] = np.zeros(3, np.float32)
    return arrays, meta


@pytest.mark.parametrize("kind", ["shape", "dtype", "base model", "exit layer", "parameters"])
def test_mismatched_blob_is_refused_once_and_counted(redis_client, kind):
    WeightStore(redis_client, "run").publish(3, *_mismatch(kind))
    # the actor's spec (selfspec.head_format.HeadSpec, the one fit rule; its loader path: tests/unit/test_head_format.py)
    actor = WeightStore(redis_client, "run", expected=HeadSpec.of(_head(), {"exit_layer": 4}, BASE))
    with pytest.raises(WeightsRefused, match=f"weights v3 refused: .*{kind.split()[0]}"):
        actor.pull_if_newer(2)
    assert actor.refused == 1
    assert actor.pull_if_newer(2) is None and actor.refused == 1  # not fetched and refused again every poll
    WeightStore(redis_client, "run").publish(4, _head(4), {"base_model": BASE})
    assert actor.pull_if_newer(2)[0] == 4  # a good version after a bad one is taken


def test_corrupted_blob_is_refused_on_checksum(redis_client):
    WeightStore(redis_client, "run").publish(1, _head(), {"base_model": BASE})
    key = RunKeys("run").weights(1)
    last = redis_client.strlen(key) - 1
    redis_client.setrange(key, last, bytes([redis_client.getrange(key, last, last)[0] ^ 0x40]))
    actor = WeightStore(redis_client, "run", expected=HeadSpec.of(_head(), {}, BASE))
    with pytest.raises(WeightsRefused, match="checksum mismatch"):
        actor.pull_if_newer(None)
    assert actor.refused == 1


def test_publisher_with_a_spec_refuses_before_writing(redis_client):
    learner = WeightStore(redis_client, "run", expected=HeadSpec.of(_head(), {}, BASE))
    with pytest.raises(WeightsRefused, match="shape"):
        learner.publish(1, *_mismatch("shape"))
    assert learner.latest_version() is None
