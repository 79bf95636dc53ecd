"""Two learner ranks as Ray actors in one DeepSpeed (gloo) group on this machine: they share the stream
through the consumer group, each transition going to exactly one rank, and end with identical heads."""
from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from learner_data import K, config, greedy_paths, rounds, save_model, verifier, write

from buffer.stream import run_stats
from learner.launch import LearnerGroup
from selfspec.drafter import DrafterHead
from selfspec.split import SplitModel



@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_ranks_split_the_stream_and_stay_identical(local_ray, redis_server, redis_client, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = verifier()
        save_model(model, tmp_path / "model")
        cfg = config(tmp_path, redis_server.url, run_id="ranks", batch_size=32, reuse=2, publish_every_steps=4,
                     **{"placement.ranks": 2, "placement.num_cpus": 1, "checkpoint.every_steps": 6})
        torch.manual_seed(cfg.seed)
        head = DrafterHead(SplitModel(model, K), cfg.head)
        sent = [t for p in greedy_paths(model, 12) for t in rounds(p, head, run_id="ranks")]
    finally:
        torch.set_num_threads(threads)
    write(redis_client, cfg.run_id, sent)

    group = LearnerGroup(cfg, record_ids=True)
    try:
        summaries = group.run()
        params = group.parameters()
    finally:
        group.shutdown()

    assert [s["rank"] for s in summaries] == [0, 1] and len(set(s["pid"] for s in summaries)) == 2
    ids = [s["trained_ids"] for s in summaries]
    assert all(len(i) > 0 for i in ids), "each rank read its share"
    assert set(ids[0]).isdisjoint(ids[1]) and sorted(ids[0] + ids[1]) == sorted(t.transition_id for t in sent)
    assert run_stats(redis_client, cfg.run_id) == {"written": len(sent), "consumed": len(sent)}
    assert sum(s["counters"]["consumed"] for s in summaries) == len(sent)
    assert summaries[0]["step"] == summaries[1]["step"] >= 2 * (len(sent) // cfg.batch_size)  # in lockstep, reuse 2
    assert summaries[0]["version"] == summaries[1]["version"] > 0
    assert params[0].keys() == params[1].keys()
    for name in params[0]:
        np.testing.assert_array_equal(params[0][name], params[1][name], err_msg=name)
    assert any(not np.array_equal(p, q) for p, q in zip(params[0].values(), head.trainable_state().values())), \
        "the heads trained"
