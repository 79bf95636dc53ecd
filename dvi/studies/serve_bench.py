"""Load-testing any OpenAI-compatible endpoint with a dvi trace: `dvi bench-serve` (vLLM's `bench serve`).

The trace is replayed by the dispatcher of `dvi run` (actors/dispatch.py), with the same arrival processes
(actors/arrivals.py), but its actors are HTTP clients: `EndpointClient`s, each sending one streamed request
at a time with the official `openai` client, so a request never waits for another inside one client while
the dispatcher has an idle one. How many clients: a closed loop's users, else `--max-concurrency`, else one
per request (at most MAX_CLIENTS): open-loop arrivals then reach the server at their time, as vLLM's
default (no concurrency limit) does.

A trace line with `messages` goes to /chat/completions, one with `prompt` to /completions; max_new_tokens
is max_tokens, temperature as the trace gives it. A later turn of a conversation (assistant placeholders,
actors/trace.py) goes to the client that served its previous turn, after it completed (the dispatcher
ensures both), and that client fills each placeholder with the answer text the server streamed to it
(`ConversationMemory`, as a generation actor does with its own answers).

Times are measured by the client from when it sends the request (as vLLM does): TTFT to the first chunk
with text, E2E to the end of the stream, ITL the gaps between chunks with text (a dvi server streams a
verify round per chunk, so one gap can cover several tokens), TPOT = (E2E - TTFT) / (tokens - 1). Tokens are
the server's `usage` (stream_options.include_usage) where it sends one, else the chunks with text. A dvi
server's last chunk carries `{"dvi": {"mean_accepted_length", "drafted", "accepted", "head_version",
"replica"}}`: kept per request, and the mean accepted length (MAL) is reported when present.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from dvi.errors import UserError
from dvi.report.format import mean, number, percentiles

MAX_CLIENTS = 1000  # the openai client's connection pool (max_connections) holds this many streams
CHECK_TIMEOUT_S = 10.0  # GET /models before the replay: an endpoint that does not answer in this long is down


# ---------------------------------------------------------------- arrivals and clients


def parse_arrival(text: str | None):
    """`--arrival` (YAML: `{kind: closed_loop, users: 8}`, or a bare kind such as `recorded`) as an
    ArrivalSpec; None: the trace's own timestamps (`recorded`)."""
    import yaml
    from pydantic import TypeAdapter, ValidationError

    from actors.arrivals import ArrivalSpec, RecordedSpec

    if text is None:
        return RecordedSpec(kind="recorded")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"--arrival {text!r}: not YAML ({str(err).splitlines()[0]})") from None
    if isinstance(data, str):
        data = {"kind": data}
    try:
        return TypeAdapter(ArrivalSpec).validate_python(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:] or e['loc'])) or 'arrival'}: {e['msg']}"
                             for e in err.errors())
        raise ValueError(f"--arrival {text!r}: {problems} (e.g. recorded, '{{kind: poisson, rate: 4}}', "
                         f"'{{kind: closed_loop, users: 8}}')") from None


def client_count(arrival, n_requests: int, max_concurrency: int | None = None) -> int:
    """HTTP clients (= requests in flight at most): --max-concurrency, else a closed loop's users, else one
    per request, at most MAX_CLIENTS."""
    from actors.arrivals import ClosedLoopSpec

    if max_concurrency is not None:
        if not 1 <= max_concurrency <= MAX_CLIENTS:
            raise ValueError(f"--max-concurrency must be between 1 and {MAX_CLIENTS}, got {max_concurrency}")
        return max_concurrency
    if isinstance(arrival, ClosedLoopSpec):
        if arrival.users > MAX_CLIENTS:
            raise ValueError(f"closed_loop users: at most {MAX_CLIENTS}, got {arrival.users}")
        return arrival.users
    return max(1, min(n_requests, MAX_CLIENTS))


def connect(url: str, api_key: str | None, model: str | None, timeout_s: float):
    """An openai client for `url`, and the model to ask for (--model, else the first the endpoint lists),
    after checking that the endpoint answers: an endpoint that does not is one UserError, before any replay."""
    try:
        import openai
    except ImportError:
        raise UserError("dvi bench-serve needs the openai client: pip install openai") from None

    client = openai.OpenAI(base_url=url, api_key=api_key or "none", timeout=timeout_s, max_retries=0)
    try:
        listed = [m.id for m in client.with_options(timeout=CHECK_TIMEOUT_S).models.list()]
    except openai.APIConnectionError as err:
        client.close()
        cause = err.__cause__ or err
        raise UserError(f"cannot reach {url} ({type(cause).__name__}: {cause}); is the server running?") from None
    except openai.APIStatusError as err:
        if err.status_code in (401, 403):
            client.close()
            raise UserError(f"{url} refused the API key (HTTP {err.status_code}): give the right one with "
                            f"--api-key") from None
        if model is None:
            client.close()
            hint = "" if url.rstrip("/").endswith("/v1") else f" (did you mean {url.rstrip('/')}/v1?)"
            raise UserError(f"{url}/models answered HTTP {err.status_code}{hint}; for an endpoint without "
                            f"/models, give the model with --model") from None
        return client, model  # an endpoint without /models: take --model on trust
    if model is None:
        if not listed:
            client.close()
            raise UserError(f"{url} lists no models: give one with --model")
        return client, listed[0]
    if model not in listed:
        client.close()
        raise UserError(f"{url} serves {', '.join(listed)}, not {model}")
    return client, model


def _status_error(err) -> str:
    body = err.body if isinstance(err.body, dict) else {}
    message = body.get("message") if isinstance(body.get("message"), str) else getattr(err, "message", str(err))
    lines = str(message).strip().splitlines()
    return f"HTTP {err.status_code}: {lines[0]}" if lines else f"HTTP {err.status_code}"


class EndpointClient:
    """One HTTP client of the replay, the dispatcher's actor: `client(request) -> result`, one request at a
    time (the dispatcher runs it on its own thread). Never raises for a request: an HTTP error, a broken
    stream or an answer it cannot read is the result's `error`."""

    def __init__(self, openai_client, model: str, index: int):
        from actors.trace import ConversationMemory

        self.client, self.model, self.index = openai_client, model, index
        self.memory = ConversationMemory()  # this client's answers, for the later turns sent to it

    def __call__(self, request: dict) -> dict:
        import openai

        result = {"request_id": request["request_id"], "tokens": 0, "t_first_token_s": 0.0, "t_total_s": 0.0,
                  "mean_accepted_length": None, "error": None}
        start = time.perf_counter()
        try:
            answer = self._stream(request, result, start)
        except openai.APIStatusError as err:
            result["error"] = _status_error(err)
        except openai.APIConnectionError as err:
            cause = err.__cause__ or err
            result["error"] = f"connection error: {type(cause).__name__}: {cause}".rstrip(": ")
        except Exception as err:  # noqa: BLE001 - a mid-stream error event, a missing conversation turn
            lines = str(err).strip().splitlines()
            result["error"] = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
        else:
            self.memory.remember(request, answer)
        result["http_latency_s"] = result["t_total_s"] = time.perf_counter() - start
        if result["error"] is None and result["tokens"] == 0:
            result["t_first_token_s"] = result["t_total_s"]  # nothing streamed: the first token is the end
        result["http_ttft_s"] = result["t_first_token_s"]
        return result

    def _stream(self, request: dict, result: dict, start: float) -> str:
        chat = request.get("messages") is not None
        common = {"model": self.model, "max_tokens": request["max_new_tokens"],
                  "temperature": request.get("temperature", 0.0), "stream": True,
                  "stream_options": {"include_usage": True}}
        if chat:
            stream = self.client.chat.completions.create(messages=self.memory.messages_for(request), **common)
        else:
            stream = self.client.completions.create(prompt=request["prompt"], **common)
        texts, stamps, usage, dvi, finish = [], [], None, None, None
        with stream:
            for chunk in stream:
                now = time.perf_counter() - start
                if chunk.usage is not None:
                    usage = chunk.usage
                extra = chunk.model_extra or {}
                if isinstance(extra.get("dvi"), dict):
                    dvi = extra["dvi"]
                for choice in chunk.choices or ():
                    text = choice.delta.content if chat else choice.text
                    if text:
                        texts.append(text)
                        stamps.append(now)
                    finish = choice.finish_reason or finish
        counted = getattr(usage, "completion_tokens", None)
        from_usage = isinstance(counted, int) and not isinstance(counted, bool) and counted >= 0
        result["tokens"] = counted if from_usage else len(stamps)
        result["tokens_from"] = "usage" if from_usage else "chunks"
        result["prompt_tokens"] = getattr(usage, "prompt_tokens", None)
        result["t_first_token_s"] = stamps[0] if stamps else 0.0
        result["itl_s"] = [round(b - a, 6) for a, b in zip(stamps, stamps[1:])]
        result["chunks"] = len(stamps)
        result["finish_reason"] = finish
        if dvi is not None:
            result["mean_accepted_length"] = number(dvi.get("mean_accepted_length"))
            result.update({key: dvi.get(key) for key in ("drafted", "accepted", "head_version", "replica")})
        return "".join(texts)


# ---------------------------------------------------------------- the report


def stats_ms(values_s: list[float]) -> dict | None:
    """{"mean", "median", "p90", "p99"} in milliseconds of values in seconds; None for none."""
    values = [v for v in (number(x) for x in values_s) if v is not None]
    found = percentiles(values)
    if found is None:
        return None
    median, p90, p99 = (v * 1000 for v in found)  # format.PERCENTILES: 50, 90, 99
    return {"mean": mean(values) * 1000, "median": median, "p90": p90, "p99": p99}


def summarize(records: list[dict], duration_s: float) -> dict:
    """vLLM's bench-serve numbers from the replay's request records (RequestRecord.to_dict(), the client's
    result fields in `extra`): counts, throughput over `duration_s`, and TTFT, TPOT, ITL and E2E latency."""
    ok = [r for r in records if r.get("ok")]
    extra = [r.get("extra") or {} for r in ok]
    output = sum(r.get("tokens") or 0 for r in ok)
    prompts = [e.get("prompt_tokens") for e in extra]
    known_prompts = all(isinstance(p, int) for p in prompts)
    ttft = [e.get("http_ttft_s") for e in extra]
    e2e = [e.get("http_latency_s") for e in extra]
    tpot = [(e["http_latency_s"] - e["http_ttft_s"]) / (r["tokens"] - 1) for r, e in zip(ok, extra)
            if (r.get("tokens") or 0) > 1 and number(e.get("http_latency_s")) is not None
            and number(e.get("http_ttft_s")) is not None]
    itl = [gap for e in extra for gap in e.get("itl_s") or ()]
    mals = [r["mean_accepted_length"] for r in ok if number(r.get("mean_accepted_length")) is not None]
    duration = duration_s if duration_s > 0 else None
    errors: dict[str, int] = {}
    for r in records:
        if not r.get("ok"):
            text = r.get("error") or "unknown error"
            errors[text] = errors.get(text, 0) + 1
    return {
        "requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "input_tokens": sum(prompts) if known_prompts and ok else None, "output_tokens": output,
        "request_throughput": len(ok) / duration if duration else None,
        "output_tokens_per_s": output / duration if duration else None,
        "total_tokens_per_s": (sum(prompts) + output) / duration if duration and known_prompts and ok else None,
        "max_concurrent_requests": max_in_flight(records),
        "ttft_ms": stats_ms(ttft), "tpot_ms": stats_ms(tpot), "itl_ms": stats_ms(itl), "e2e_ms": stats_ms(e2e),
        "mean_accepted_length": mean(mals), "requests_with_mal": len(mals),
        "errors": dict(sorted(errors.items(), key=lambda item: -item[1])),
    }


def max_in_flight(records: list[dict]) -> int:
    """The most requests outstanding at once (sent, not yet done), from the records' times."""
    sent = [r for r in records if r.get("sent_s") is not None and r.get("done_s") is not None]
    events = sorted([(r["sent_s"], 1) for r in sent] + [(r["done_s"], -1) for r in sent])  # an end before a start
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def requests_path(out: str | Path) -> Path:
    """Where the per-request records go: next to the JSON report, `NAME.requests.jsonl`."""
    out = Path(out)
    return out.with_name(out.stem + ".requests.jsonl")


# ---------------------------------------------------------------- the replay


@dataclass(frozen=True)
class ServeBenchSpec:
    """What `dvi bench-serve` replays, against what."""
    url: str  # the endpoint's base URL (.../v1)
    trace_path: str
    out: str | Path  # the JSON report; the per-request records go beside it (requests_path)
    model: str | None = None  # None: the first the endpoint lists
    api_key: str | None = None
    arrival: str | None = None  # YAML of an arrival spec; None: the trace's timestamps
    max_concurrency: int | None = None  # HTTP clients; None: client_count decides
    seed: int = 0
    timeout_s: float = 600.0


def run_serve_bench(bench: ServeBenchSpec, progress: bool = True) -> dict:
    """Replay the trace against the endpoint; the per-request records go to requests_path(out) as they
    finish. Returns the report (the JSON's content): settings, versions and the summary."""
    from actors.dispatch import Dispatcher, line_error_records
    from actors.trace import read_trace
    from dvi.run.runner import Trace, replay_recorded
    from selfspec.versions import package_versions

    url, trace_path, out, seed, timeout_s = bench.url, bench.trace_path, bench.out, bench.seed, bench.timeout_s

    spec = parse_arrival(bench.arrival)
    try:
        requests, bad_lines = read_trace(trace_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"trace file {trace_path} not found: write one with `dvi trace make`, e.g. "
                                f"dvi trace make --source builtin --n 50 --rate 2 --out {trace_path}") from None
    if not requests:
        raise ValueError(f"{trace_path}: no good requests ({len(bad_lines)} bad lines; `dvi trace check {trace_path}`)")
    clients = client_count(spec, len(requests), bench.max_concurrency)
    url = url.rstrip("/")
    client, model = connect(url, bench.api_key, bench.model, timeout_s)
    report = {"command": "dvi bench-serve", "url": url, "model": model, "trace": str(trace_path),
              "arrival": spec.model_dump(), "clients": clients, "seed": seed, "timeout_s": timeout_s,
              "cpus": os.cpu_count(), "versions": {**package_versions(), "openai": _version("openai")},
              "requests_file": str(requests_path(out))}
    records_file = requests_path(out)
    records_file.parent.mkdir(parents=True, exist_ok=True)
    dispatcher = Dispatcher([EndpointClient(client, model, i) for i in range(clients)])
    start = time.perf_counter()
    try:
        records = replay_recorded(Trace(requests, line_error_records(bad_lines)), spec, dispatcher, records_file,
                                  seed, dict if progress else None)  # the bar: failures only
    finally:
        duration_s = time.perf_counter() - start
        client.close()
    report["summary"] = summarize(records, duration_s)
    return report
