"""Traffic replay without Ray: the trace format, loaders, arrival processes, workload schedules, the
replay loop over plain callables, and `dvi trace make`."""
import json
import threading
import time

import numpy as np
import pytest

from actors.arrivals import ClosedLoop, OpenLoop, RecordedSpec, burst_times, on_off_times, poisson_times
from actors.dispatch import Dispatcher, replay, replay_trace
from actors.schedules import MixturePoint, MixtureSchedule, MixtureSpec, Phase, PhaseSchedule
from actors.trace import ConversationMemory, TraceRequest, read_trace, write_trace
from actors.traffic import TraceSpec, make_trace, trace_summary
from actors.workloads import SpecBenchSource
from dvi.cli import main


def request(i, t=0.0, workload="chat", **kw):
    fields = dict(arrival_s=t, request_id=f"r{i}", workload=workload, messages=[{"role": "user", "content": f"q{i}"}],
                  max_new_tokens=8, temperature=0.0)
    return TraceRequest(**{**fields, **kw})


def write_spec_bench(path):
    rows = [{"question_id": 1, "category": "writing", "turns": ["Write a haiku."]},
            {"question_id": 2, "category": "math", "turns": ["What is 2+2?", "Now double it."]},
            {"question_id": 3, "category": "writing", "turns": ["Write a limerick."]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- the trace format -------------------------------------------------------------------------------

def test_trace_round_trips_exactly(tmp_path):
    trace = [request(0, 0.1 + 0.2, source="builtin:chat-0"),
             TraceRequest(arrival_s=1.5, request_id="r1", workload="code", prompt="def f(x):  # é ✓",
                          max_new_tokens=3, temperature=0.7),
             request(2, 2.0, "math", conversation_id="c#0", messages=[
                 {"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
                 {"role": "assistant", "content": None}, {"role": "user", "content": "b"}])]
    path = tmp_path / "t.jsonl"
    write_trace(trace, path)
    again, errors = read_trace(path)
    assert errors == [] and again == trace
    assert again[0].arrival_s == 0.1 + 0.2 and again[2].turn == 1
    assert '"content": null' in path.read_text().splitlines()[2]  # the placeholder survives as an explicit null
    write_trace(again, tmp_path / "u.jsonl")
    assert (tmp_path / "u.jsonl").read_bytes() == path.read_bytes()


def test_malformed_lines_are_reported_per_line_and_good_lines_load(tmp_path):
    good = request(0).to_dict()
    lines = [
        json.dumps(good),                                                          # 1 good
        '{"arrival_s": 1.0, "request_id": "r1", ',                                 # 2 truncated
        json.dumps({**good, "request_id": "r2", "max_new_tokens": 0}),             # 3 bad value
        "",                                                                        # 4 blank: skipped
        json.dumps({**good, "request_id": "r3", "prompt": "x"}),                   # 5 messages and prompt
        json.dumps({**good, "request_id": "r4", "temprature": 0.5}),               # 6 misspelt key
        json.dumps({**good, "request_id": "r5", "messages": [
            {"role": "user", "content": "a"}, {"role": "assistant", "content": None},
            {"role": "user", "content": "b"}]}),                                   # 7 placeholder, no conversation
        json.dumps(good),                                                          # 8 duplicate id
        "[1, 2]",                                                                  # 9 not an object
        json.dumps({**good, "request_id": "r9", "arrival_s": 4.0}),                # 10 good
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    requests, errors = read_trace(path)
    assert [r.request_id for r in requests] == ["r0", "r9"]
    assert [e.line for e in errors] == [2, 3, 5, 6, 7, 8, 9]
    by_line = {e.line: str(e) for e in errors}
    assert "not JSON" in by_line[2]
    assert "(request r2)" in by_line[3] and "max_new_tokens" in by_line[3]
    assert "exactly one of messages or prompt" in by_line[5]
    assert "temprature" in by_line[6]
    assert "conversation_id" in by_line[7]
    assert "duplicate request_id r0" in by_line[8]
    assert "expected a JSON object" in by_line[9]
    assert all(str(e).startswith(f"{path}:{e.line}") and "\n" not in str(e) for e in errors)


# --- loaders ----------------------------------------------------------------------------------------

def test_spec_bench_two_turn_question_becomes_two_requests_with_a_placeholder(tmp_path):
    path = write_spec_bench(tmp_path / "q.jsonl")
    spec = TraceSpec(n=4, sources=[SpecBenchSource(kind="spec_bench", path=str(path))],
                     schedule={"kind": "phases", "phases": [{"workload": "math", "requests": 2},
                                                             {"workload": "writing", "requests": 2}]},
                     arrival={"kind": "burst", "size": 1, "every_s": 1.0})
    trace = make_trace(spec)
    first, second = trace[0], trace[1]
    assert first.messages[0].content == "What is 2+2?" and first.turn == 0
    assert second.turn == 1 and first.conversation_id == second.conversation_id == "spec_bench:2#0"
    assert [(m.role, m.content) for m in second.messages] == [
        ("user", "What is 2+2?"), ("assistant", None), ("user", "Now double it.")]
    assert [(r.workload, r.source, r.conversation_id) for r in trace[2:]] == [
        ("writing", "spec_bench:1", None), ("writing", "spec_bench:3", None)]  # single-turn: no conversation
    # The serving side fills the placeholder with its own answer to turn 0.
    memory = ConversationMemory()
    memory.remember(first.to_dict(), "4")
    assert memory.messages_for(second.to_dict())[1] == {"role": "assistant", "content": "4"}
    with pytest.raises(ValueError, match="no answer to turn 0 of conversation spec_bench:2#0"):
        ConversationMemory().messages_for(second.to_dict())



def test_trace_summary_counts_exact_repeats(tmp_path):
    """A source smaller than the trace starts over: its prompts come back, counted as exact repeats (a traffic
    memory serves them as cache hits), per workload; a fresh trace has none."""
    path = write_spec_bench(tmp_path / "q.jsonl")
    spec = dict(sources=[SpecBenchSource(kind="spec_bench", path=str(path), categories=["writing"])],
                arrival={"kind": "burst", "size": 1, "every_s": 1.0})
    rows = trace_summary(make_trace(TraceSpec(n=5, **spec)))
    assert [(r["workload"], r["requests"], r["repeats"]) for r in rows] == [("writing", 5, 3)]
    assert trace_summary(make_trace(TraceSpec(n=2, **spec)))[0]["repeats"] == 0

def test_the_spec_bench_file_loads_every_turn(spec_bench_file):
    workloads = SpecBenchSource(kind="spec_bench").load()  # no path: Spec-Bench's own questions
    assert sum(map(len, workloads.values())) == 480
    assert all(len(c.turns) == 2 for c in workloads["writing"])


def test_humaneval_and_prompt_lists(tmp_path):
    (tmp_path / "mine.txt").write_text("first prompt\n\n  second prompt  \n")
    spec = TraceSpec(n=6, seed=3, sources=[{"kind": "humaneval"}, {"kind": "prompts", "path": str(tmp_path / "mine.txt")}],
                     schedule={"kind": "phases", "phases": [{"workload": "code", "requests": 3}, {"workload": "mine", "requests": 3}]})
    trace = make_trace(spec)
    assert [r.workload for r in trace] == ["code"] * 3 + ["mine"] * 3
    assert trace[0].source == "humaneval:HumanEval/0" and "def has_close_elements" in trace[0].messages[0].content
    # two prompts, three requests: the list starts over
    assert [r.messages[0].content for r in trace[3:]] == ["first prompt", "second prompt", "first prompt"]
    assert [r.source for r in trace[3:]] == ["prompts:mine.txt:1", "prompts:mine.txt:3", "prompts:mine.txt:1"]


# --- arrival processes ------------------------------------------------------------------------------

def test_poisson_rate_and_seed():
    n, rate = 4000, 5.0
    times = poisson_times(n, rate, np.random.default_rng(7))
    gaps = np.diff(np.concatenate([[0.0], times]))
    # mean gap 1/rate within 5 standard errors; exponential gaps have std = mean (regular spacing would not)
    assert abs(gaps.mean() - 1 / rate) < 5 * (1 / rate) / np.sqrt(n)
    assert abs(gaps.std() / gaps.mean() - 1) < 0.1
    assert np.array_equal(times, poisson_times(n, rate, np.random.default_rng(7)))
    assert not np.array_equal(times, poisson_times(n, rate, np.random.default_rng(8)))


def test_bursts_and_on_off():
    assert burst_times(7, 3, 2.5).tolist() == [0, 0, 0, 2.5, 2.5, 2.5, 5.0]
    times = on_off_times(3000, rate=10.0, on_s=1.0, off_s=4.0, rng=np.random.default_rng(0))
    assert np.all(np.diff(times) >= 0)
    assert np.all((times % 5.0) < 1.0)  # nothing during the 4 s off after each 1 s on
    on_time = np.floor(times[-1] / 5.0) * 1.0 + times[-1] % 5.0
    assert abs(len(times) / on_time - 10.0) < 1.0  # 10/s while on (the estimate's std is ~0.18)


def test_open_loop_interface():
    arrivals = OpenLoop([0.0, 0.5, 0.5])
    seen = []
    while (t := arrivals.next_at()) is not None:
        seen.append(t)
        arrivals.sent(t)
    assert seen == [0.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="non-decreasing"):
        OpenLoop([1.0, 0.5])


def test_closed_loop_waits_for_completions_and_thinks():
    loop = ClosedLoop(users=2, think_s=0.25)
    loop.sent(0.0)
    loop.sent(0.0)
    assert loop.next_at() is None  # both users are waiting for an answer
    loop.done(1.0)
    assert loop.next_at() == 1.25  # that user thinks 0.25 s before sending again


def test_closed_loop_replay_never_has_more_than_n_in_flight():
    users, lock, state = 3, threading.Lock(), {"now": 0, "max": 0}

    def actor(req):  # one of 5 actors, so the users, not the actors, bound concurrency
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.03)
        with lock:
            state["now"] -= 1
        return {"request_id": req["request_id"], "tokens": 4, "t_first_token_s": 0.01, "t_total_s": 0.03,
                "mean_accepted_length": 1.0, "error": None}

    dispatcher = Dispatcher([actor] * 5)
    records = replay([request(i) for i in range(24)], ClosedLoop(users), dispatcher)
    dispatcher.close()
    assert all(r.ok for r in records)
    assert state["max"] == users
    # the same from the records: no instant with more than `users` requests between send and done
    events = sorted([(r.sent_s, 1) for r in records] + [(r.done_s, -1) for r in records], key=lambda e: (e[0], e[1]))
    assert max(np.cumsum([e[1] for e in events])) <= users


# --- the dispatcher over plain callables ------------------------------------------------------------

def echo(req):
    """A stand-in actor that really spends its time: a first token after 5 ms, done after 10 ms."""
    start = time.monotonic()
    time.sleep(0.005)
    first = time.monotonic() - start
    time.sleep(0.005)
    return {"request_id": req["request_id"], "tokens": req["max_new_tokens"], "t_first_token_s": first,
            "t_total_s": time.monotonic() - start, "mean_accepted_length": 2.0, "error": None, "head_version": 3}


def test_least_loaded_routing():
    release = threading.Event()

    def slow(req):
        release.wait(10)
        return echo(req)

    dispatcher = Dispatcher([slow, echo])
    assert [dispatcher.submit(request(i).to_dict()) for i in range(2)] == [0, 1]  # a tie goes to the lower index
    assert [c.request_id for c in dispatcher.wait(10)] == ["r1"]  # the fast actor is free again
    assert dispatcher.submit(request(2).to_dict()) == 1  # outstanding: slow 1, fast 0
    # outstanding 1 and 1 (nothing observed since): the actor given fewer requests so far wins the tie
    assert dispatcher.submit(request(3).to_dict()) == 0
    release.set()
    dispatcher.close()


def test_failed_requests_are_recorded_not_dropped():
    def flaky(req):
        if req["workload"] == "boom":
            raise RuntimeError("boom\nsecond line")
        if req["workload"] == "refused":
            return {**echo(req), "error": "prompt longer than the model's context"}
        return echo(req)

    trace = [request(0), request(1, workload="boom"), request(2, workload="refused"), request(3)]
    dispatcher = Dispatcher([flaky])
    records = replay(trace, OpenLoop([0, 0, 0, 0]), dispatcher)
    dispatcher.close()
    assert [(r.request_id, r.ok, r.error) for r in records] == [
        ("r0", True, None), ("r1", False, "RuntimeError: boom"),
        ("r2", False, "prompt longer than the model's context"), ("r3", True, None)]
    good = records[0]
    assert good.tokens == 8 and 0 < good.tokens_per_s <= 8 / 0.01 and good.mean_accepted_length == 2.0
    assert good.extra == {"head_version": 3}
    assert 0.005 <= good.ttft_s < good.latency_s and good.latency_s >= 0.01
    # one actor, four requests at once: the last waited in the actor's queue behind r0 and r2 (10 ms each;
    # r1 raised at once), and both its latency and its time to first token include that wait
    assert records[3].latency_s > 0.029 and records[3].ttft_s > 0.024


def test_later_turn_waits_for_its_previous_turn_on_the_same_actor():
    memories = [ConversationMemory(), ConversationMemory()]

    def make_actor(i):
        def actor(req):
            time.sleep(0.05)
            messages = memories[i].messages_for(req)  # raises when this actor never answered turn 0
            memories[i].remember(req, f"answer {req['request_id']}")
            return {**echo(req), "messages": messages}
        return actor

    turn0 = request(0, conversation_id="c#0")
    turn1 = request(1, conversation_id="c#0", messages=[
        {"role": "user", "content": "q0"}, {"role": "assistant", "content": None}, {"role": "user", "content": "q1"}])
    orphan = request(2, conversation_id="d#0", messages=turn1.to_dict()["messages"])  # its turn 0 is missing
    dispatcher = Dispatcher([make_actor(0), make_actor(1)])
    records = replay([turn0, turn1, request(3), orphan], OpenLoop([0, 0, 0, 0]), dispatcher)
    dispatcher.close()
    r0, r1, r3, r2 = records
    assert r0.ok and r1.ok and r3.ok and r1.actor == r0.actor != r3.actor
    assert r1.sent_s >= r0.done_s  # held until turn 0 was answered
    assert r1.extra["messages"][1] == {"role": "assistant", "content": "answer r0"}
    assert not r2.ok and "turn 0 of conversation d#0 is not in the trace" in r2.error


def test_a_later_turn_of_a_failed_turn_fails_too():
    def actor(req):
        if req["request_id"] == "r0":
            raise RuntimeError("out of memory")
        return echo(req)

    turn1 = request(1, conversation_id="c#0", messages=[
        {"role": "user", "content": "q0"}, {"role": "assistant", "content": None}, {"role": "user", "content": "q1"}])
    dispatcher = Dispatcher([actor])
    records = replay([request(0, conversation_id="c#0"), turn1, request(2)], ClosedLoop(users=2), dispatcher)
    dispatcher.close()
    assert [(r.ok, r.error) for r in records] == [(False, "RuntimeError: out of memory"),
                                                  (False, "its previous turn r0 failed"), (True, None)]


def test_recorded_arrivals_are_sorted_and_rescaled():
    trace = [request(0, 0.4), request(1, 0.0), request(2, 0.2)]
    dispatcher = Dispatcher([echo, echo])
    records = replay_trace(trace, RecordedSpec(kind="recorded", time_scale=0.5), dispatcher)
    dispatcher.close()
    assert [(r.request_id, r.arrival_s) for r in records] == [("r1", 0.0), ("r2", 0.1), ("r0", 0.2)]
    assert all(r.ok and r.sent_s >= r.arrival_s for r in records)


# --- workload schedules -----------------------------------------------------------------------------

def test_phase_boundaries_are_exact():
    schedule = PhaseSchedule([Phase(workload="code", requests=3), Phase(workload="translation", seconds=2.0),
                              Phase(workload="math", requests=2), Phase(workload="qa", seconds=1.0)])
    times = [0.0, 0.5, 1.0, 1.5, 2.999, 3.0, 3.1, 3.2, 4.1, 4.2, 9.0]
    # code: 3 requests (ends at t=1.0); translation: [1.0, 3.0); math: 2 requests (ends 3.1); qa runs on
    assert [schedule.next(t) for t in times] == ["code"] * 3 + ["translation"] * 2 + ["math"] * 2 + ["qa"] * 4


def test_mixture_proportions_shift_as_specified():
    n = 4000
    spec = MixtureSpec(kind="mixture", axis="requests", points=[MixturePoint(at=0, weights={"a": 1.0, "b": 0.0}),
                                                                MixturePoint(at=n, weights={"a": 0.0, "b": 1.0})])
    schedule = MixtureSchedule(spec, np.random.default_rng(1))
    picks = np.array([schedule.next(0.0) == "a" for _ in range(n)])
    for lo, hi in [(0, 1000), (1500, 2500), (3000, 4000)]:
        p = 1 - np.arange(lo, hi) / n  # weight of a at each index
        bound = 5 * np.sqrt(np.sum(p * (1 - p)))  # 5 binomial standard deviations
        assert abs(picks[lo:hi].sum() - p.sum()) < bound, (lo, hi)
    assert picks[:1000].mean() > 0.8 and picks[3000:].mean() < 0.2  # and it really moved
    again = MixtureSchedule(spec, np.random.default_rng(1))
    assert [again.next(0.0) == "a" for _ in range(n)] == picks.tolist()


def test_mixture_over_seconds_holds_the_ends_flat():
    spec = MixtureSpec(kind="mixture", axis="seconds", points=[MixturePoint(at=10, weights={"a": 1}),
                                                               MixturePoint(at=20, weights={"b": 1})])
    schedule = MixtureSchedule(spec, np.random.default_rng(0))
    assert [schedule.next(t) for t in (0.0, 5.0, 10.0)] == ["a"] * 3 and schedule.next(25.0) == "b"
    assert schedule.weights(15.0).tolist() == [0.5, 0.5]


# --- dvi trace make ---------------------------------------------------------------------------------

def test_trace_make_end_to_end(tmp_path, capsys):
    questions = write_spec_bench(tmp_path / "q.jsonl")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""
n: 12
seed: 5
max_new_tokens: 32
sources:
  - {{kind: builtin}}
  - {{kind: spec_bench, path: {questions}}}
schedule:
  kind: mixture
  points:
    - {{at: 0, weights: {{code: 1, math: 0}}}}
    - {{at: 12, weights: {{code: 0, math: 1}}}}
arrival: {{kind: poisson, rate: 4}}
""")
    out = tmp_path / "trace.jsonl"
    assert main(["trace", "make", "--config", str(spec), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "12 requests written" in printed and "arrival span" in printed
    trace, errors = read_trace(out)
    assert errors == [] and len(trace) == 12 and {r.workload for r in trace} <= {"code", "math"}
    assert all(r.max_new_tokens == 32 for r in trace) and [r.arrival_s for r in trace] == sorted(r.arrival_s for r in trace)
    first = out.read_bytes()
    assert main(["trace", "make", "--config", str(spec), "--out", str(out)]) == 0
    assert out.read_bytes() == first  # same spec and seed: the same file
    assert main(["trace", "make", "--config", str(spec), "--seed", "6", "--out", str(out)]) == 0
    assert out.read_bytes() != first


def test_trace_make_from_flags(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    assert main(["trace", "make", "--source", "builtin", "--n", "20", "--rate", "2", "--temperature", "0.5",
                 "--out", str(out)]) == 0
    trace, errors = read_trace(out)
    assert errors == [] and len(trace) == 20 and all(r.temperature == 0.5 for r in trace)
    assert len({r.workload for r in trace}) > 1  # uniform over the built-in categories


def test_trace_check_reports_bad_lines(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    write_trace([request(0), request(1)], path)
    path.write_text(path.read_text() + '{"request_id": "r2"}\n')
    assert main(["trace", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:3 (request r2): arrival_s: Field required" in out and "2 good requests, 1 bad lines" in out


def test_unknown_spec_key_is_one_line_naming_it(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("n: 5\nsources: [{kind: builtin}]\nphases_typo: []\n")
    assert main(["trace", "make", "--config", str(spec), "--out", str(tmp_path / "t.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "phases_typo" in err and "Extra inputs are not permitted" in err
    assert not (tmp_path / "t.jsonl").exists()


def test_closed_loop_cannot_be_written_into_a_trace(tmp_path, capsys):
    code = main(["trace", "make", "--source", "builtin", "--n", "5", "--set", "arrival={kind: closed_loop, users: 2}",
                 "--out", str(tmp_path / "t.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "closed_loop is chosen when a trace is replayed" in err


def test_schedule_naming_a_missing_workload(tmp_path, capsys):
    code = main(["trace", "make", "--source", "builtin", "--n", "5", "--out", str(tmp_path / "t.jsonl"),
                 "--set", "schedule={kind: phases, phases: [{workload: poetry, requests: 2}]}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "['poetry'] that no source provides" in err
