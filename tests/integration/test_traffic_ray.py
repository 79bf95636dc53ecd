"""The dispatcher against real Ray actors on a local Ray: least-loaded routing, multi-turn affinity,
failures recorded (an actor raising, an error result, an actor killed mid-request and restarted)."""
from __future__ import annotations

import os
import threading
import time

import pytest
import ray

from actors.arrivals import OpenLoop
from actors.dispatch import Dispatcher, replay
from actors.trace import ConversationMemory, TraceRequest



@ray.remote(max_restarts=1)
class EchoActor:
    """Sleeps like a decoder would, answers with the result dict a generation actor returns."""

    def __init__(self):
        self.memory = ConversationMemory()

    def generate(self, request: dict) -> dict:
        start = time.monotonic()
        if request["workload"] == "boom":
            raise RuntimeError("boom")
        messages = self.memory.messages_for(request)
        time.sleep(3.0 if request["workload"] == "slow" else 0.1)
        answer = f"answer {request['request_id']}"
        self.memory.remember(request, answer)
        return {"request_id": request["request_id"], "tokens": 5, "t_first_token_s": 0.02,
                "t_total_s": time.monotonic() - start, "mean_accepted_length": 1.5,
                "error": "refused" if request["workload"] == "refuse" else None,
                "pid": os.getpid(), "messages": messages}


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def request(i, workload="chat", **kw):
    return TraceRequest(**{"arrival_s": 0.0, "request_id": f"r{i}", "workload": workload,
                           "messages": [{"role": "user", "content": f"q{i}"}], "max_new_tokens": 5,
                           "temperature": 0.0, **kw})


def test_routing_turns_and_failures_on_ray_actors(local_ray):
    actors = [EchoActor.options(num_cpus=0).remote() for _ in range(2)]
    turn1 = request(1, conversation_id="c#0", messages=[{"role": "user", "content": "q0"},
                                                         {"role": "assistant", "content": None},
                                                         {"role": "user", "content": "q1"}])
    trace = [request(0, conversation_id="c#0"), turn1, request(2), request(3), request(4, "boom"),
             request(5, "refuse"), request(6)]
    records = replay(trace, OpenLoop([0.0] * len(trace)), Dispatcher(actors))
    by_id = {r.request_id: r for r in records}
    assert len(records) == len(trace)
    assert {r.request_id for r in records if not r.ok} == {"r4", "r5"}
    assert by_id["r4"].error == "RuntimeError: boom" and by_id["r5"].error == "refused"
    # least-loaded: the five sent at once alternate between the two actors (r1 waits for r0)
    assert [by_id[f"r{i}"].actor for i in (0, 2, 3, 4, 5, 6)] == [0, 1, 0, 1, 0, 1]
    # the later turn went to the actor that answered turn 0, after it, with that answer filled in
    assert by_id["r1"].actor == by_id["r0"].actor and by_id["r1"].sent_s >= by_id["r0"].done_s
    assert by_id["r1"].extra["messages"][1] == {"role": "assistant", "content": "answer r0"}
    for r in (by_id[i] for i in ("r0", "r1", "r2", "r3", "r6")):
        assert r.latency_s >= 0.1 and 0 < r.ttft_s < r.latency_s and r.tokens == 5 and r.mean_accepted_length == 1.5
    assert by_id["r6"].latency_s > 0.19  # queued behind r2 (0.1 s) and r4 on its actor, then its own 0.1 s


def test_an_actor_killed_mid_request_is_restarted_and_the_request_reported_failed(local_ray):
    actor = EchoActor.options(num_cpus=0).remote()
    first_pid = ray.get(actor.generate.remote(request(0).to_dict()))["pid"]
    # kill the process while it sleeps through the slow request; Ray restarts it (max_restarts=1)
    killer = threading.Timer(1.0, ray.kill, [actor], {"no_restart": False})
    killer.start()
    trace = [request(1, "slow"), request(2, arrival_s=4.0)]
    records = replay(trace, OpenLoop([0.0, 4.0]), Dispatcher([actor]))
    killer.join()
    slow, after = records
    # Ray 2.60 says ActorUnavailableError for an actor it is restarting, ActorDiedError for one that is gone
    assert not slow.ok and slow.error.split(":")[0] in {"ActorDiedError", "ActorUnavailableError"}
    assert "\n" not in slow.error
    assert after.ok and after.extra["pid"] != first_pid  # served by the restarted process
