"""`dvi bench-serve`'s own pieces: the summary from request records, the arrival flag, how many HTTP clients,
and what a user sees when the endpoint or the trace is missing. The replay against a real `dvi serve` is
tests/integration/test_bench_serve.py."""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from actors.arrivals import ClosedLoopSpec, ImmediateSpec, PoissonSpec, RecordedSpec
from actors.dispatch import read_result
from dvi import cli
from dvi.studies.serve_bench import (MAX_CLIENTS, EndpointClient, client_count, max_in_flight, parse_arrival,
                                     requests_path, stats_ms, summarize)


def record(rid: str, ok: bool = True, tokens: int = 4, ttft: float = 0.1, e2e: float = 0.4, itl=(0.1, 0.1, 0.1),
           prompt_tokens: int | None = 10, mal: float | None = 2.0, sent: float = 0.0,
           error: str | None = None) -> dict:
    """A RequestRecord.to_dict() as the replay writes it, with EndpointClient's fields in `extra`."""
    if not ok:
        return {"request_id": rid, "workload": "w", "sent_s": sent, "done_s": sent + e2e, "ok": False,
                "error": error or "HTTP 500: boom", "tokens": None, "mean_accepted_length": None, "extra": {}}
    return {"request_id": rid, "workload": "w", "sent_s": sent, "done_s": sent + e2e, "ok": True, "error": None,
            "tokens": tokens, "mean_accepted_length": mal,
            "extra": {"http_ttft_s": ttft, "http_latency_s": e2e, "itl_s": list(itl), "prompt_tokens": prompt_tokens}}


def test_summary_has_vllms_numbers():
    records = [record("a", tokens=4, ttft=0.1, e2e=0.4, itl=(0.1, 0.1, 0.1), prompt_tokens=10, mal=2.0, sent=0.0),
               record("b", tokens=11, ttft=0.3, e2e=1.3, itl=(0.2,) * 5, prompt_tokens=20, mal=3.0, sent=0.2),
               record("c", ok=False, error="HTTP 400: temperature", sent=0.3),
               record("d", ok=False, error="HTTP 400: temperature", sent=2.0)]
    s = summarize(records, duration_s=2.0)
    assert (s["requests"], s["completed"], s["failed"]) == (4, 2, 2)
    assert s["errors"] == {"HTTP 400: temperature": 2}
    assert (s["input_tokens"], s["output_tokens"]) == (30, 15)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_tokens_per_s"] == pytest.approx(7.5) and s["total_tokens_per_s"] == pytest.approx(22.5)
    assert s["ttft_ms"]["mean"] == pytest.approx(200) and s["ttft_ms"]["median"] == pytest.approx(200)
    # TPOT excludes the first token: (0.4 - 0.1) / 3 and (1.3 - 0.3) / 10, both 100 ms
    assert s["tpot_ms"]["mean"] == pytest.approx(100) and s["tpot_ms"]["p99"] == pytest.approx(100)
    itl = [100] * 3 + [200] * 5
    assert s["itl_ms"]["mean"] == pytest.approx(np.mean(itl))
    assert s["itl_ms"]["p90"] == pytest.approx(np.percentile(itl, 90))
    assert s["e2e_ms"]["p99"] == pytest.approx(np.percentile([400, 1300], 99))
    assert s["mean_accepted_length"] == pytest.approx(2.5) and s["requests_with_mal"] == 2
    assert s["max_concurrent_requests"] == 3  # a, b and c overlap at 0.3 s; d comes after


def test_summary_leaves_out_what_it_does_not_know():
    s = summarize([record("a", prompt_tokens=None, mal=None, tokens=1), record("b", ok=False)], duration_s=1.0)
    assert s["input_tokens"] is None and s["total_tokens_per_s"] is None  # the server sent no usage
    assert s["output_tokens_per_s"] == pytest.approx(1.0)
    assert s["tpot_ms"] is None  # one token: no time per output token after the first
    assert s["mean_accepted_length"] is None and s["requests_with_mal"] == 0  # not a dvi server
    none = summarize([record("x", ok=False)], duration_s=0.5)
    assert none["completed"] == 0 and none["ttft_ms"] is None and none["output_tokens"] == 0
    assert none["request_throughput"] == 0.0 and none["input_tokens"] is None


def test_stats_are_milliseconds_of_format_percentiles():
    values = [0.01, 0.02, 0.05, 0.5, float("nan"), None]
    got = stats_ms(values)
    finite = np.array([0.01, 0.02, 0.05, 0.5]) * 1000
    assert got == pytest.approx({"mean": finite.mean(), "median": np.median(finite),
                                 "p90": np.percentile(finite, 90), "p99": np.percentile(finite, 99)})
    assert stats_ms([]) is None


def test_max_in_flight_counts_overlaps():
    rows = [{"sent_s": 0.0, "done_s": 1.0}, {"sent_s": 1.0, "done_s": 2.0}, {"sent_s": 0.5, "done_s": 3.0},
            {"sent_s": None, "done_s": 0.1}]  # a bad trace line: never sent
    assert max_in_flight(rows) == 2  # the one ending at 1.0 is out before the one sent at 1.0 counts


def test_arrival_flag_is_dvi_runs_arrival_spec():
    assert parse_arrival(None) == RecordedSpec(kind="recorded")
    assert parse_arrival("immediate") == ImmediateSpec(kind="immediate")
    assert parse_arrival("{kind: poisson, rate: 4}") == PoissonSpec(kind="poisson", rate=4)
    assert parse_arrival('{"kind": "closed_loop", "users": 3, "think_s": 0.5}') == \
        ClosedLoopSpec(kind="closed_loop", users=3, think_s=0.5)
    assert parse_arrival("{kind: recorded, time_scale: 0.5}").time_scale == 0.5
    with pytest.raises(ValueError, match="users: Field required"):
        parse_arrival("{kind: closed_loop}")
    with pytest.raises(ValueError, match="poison"):
        parse_arrival("poison")
    with pytest.raises(ValueError, match="not YAML"):
        parse_arrival("{kind: [")


def test_clients_come_from_the_arrival_or_the_flag():
    closed = ClosedLoopSpec(kind="closed_loop", users=3)
    assert client_count(closed, 100) == 3
    assert client_count(closed, 100, max_concurrency=5) == 5
    assert client_count(RecordedSpec(kind="recorded"), 7) == 7  # open loop: every request may be in flight
    assert client_count(PoissonSpec(kind="poisson", rate=1), 10 * MAX_CLIENTS) == MAX_CLIENTS
    assert client_count(PoissonSpec(kind="poisson", rate=1), 50, max_concurrency=4) == 4
    with pytest.raises(ValueError, match="--max-concurrency"):
        client_count(closed, 10, max_concurrency=0)
    with pytest.raises(ValueError, match="users"):
        client_count(ClosedLoopSpec(kind="closed_loop", users=MAX_CLIENTS + 1), 10)


def test_requests_file_sits_next_to_the_report(tmp_path):
    assert requests_path(tmp_path / "bench_serve.json") == tmp_path / "bench_serve.requests.jsonl"


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_trace(path, rows: int = 2):
    path.write_text("".join(json.dumps({"arrival_s": 0.0, "request_id": f"r{i}", "workload": "w", "prompt": "hi",
                                        "max_new_tokens": 4, "temperature": 0.0}) + "\n" for i in range(rows)))
    return path


def test_an_unreachable_endpoint_is_one_line_before_any_replay(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", {"bench-serve": "dvi.cli.bench_serve"})
    out = tmp_path / "bench.json"
    code = cli.main(["bench-serve", "--url", f"http://127.0.0.1:{closed_port()}/v1", "--trace",
                     str(write_trace(tmp_path / "t.jsonl")), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("dvi bench-serve: error: cannot reach http://127.0.0.1:") and "running?" in err
    assert not out.exists() and not requests_path(out).exists()


def test_a_missing_trace_names_the_command_that_makes_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", {"bench-serve": "dvi.cli.bench_serve"})
    code = cli.main(["bench-serve", "--url", "http://127.0.0.1:1/v1", "--trace", str(tmp_path / "none.jsonl"),
                     "--out", str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    assert code == 2 and "none.jsonl not found" in err and "dvi trace make" in err


def test_a_request_the_endpoint_cannot_take_is_that_requests_error():
    """A connection that fails mid-replay is the request's error in the result the dispatcher reads, not a
    raised exception (a real socket with nothing behind it; no server is faked)."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{closed_port()}/v1", api_key="none", max_retries=0, timeout=5)
    request = {"request_id": "r1", "workload": "w", "prompt": "hi", "max_new_tokens": 4, "temperature": 0.0,
               "arrival_s": 0.0}
    result = EndpointClient(client, "m", 0)(request)
    assert result["error"].startswith("connection error: ") and result["request_id"] == "r1"
    assert result["t_total_s"] >= 0 and read_result(result, "r1") == result["error"]
    later = {"request_id": "r2", "workload": "w", "conversation_id": "c", "max_new_tokens": 4, "temperature": 0.0,
             "arrival_s": 0.0, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None},
                                            {"role": "user", "content": "b"}]}
    missing = EndpointClient(client, "m", 0)(later)  # its earlier turn never went through this client
    assert "no answer to turn 0 of conversation c" in missing["error"]
