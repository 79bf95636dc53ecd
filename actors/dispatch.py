"""Replaying a trace: least-loaded routing to actors, and one record per request, failed ones included.

An actor is anything with `.generate.remote(request)` returning a Ray ObjectRef (a generation actor
handle), or a plain callable `actor(request) -> result` (run on its own thread, one request at a time,
as a Ray actor would). Either way the dispatcher holds a `concurrent.futures.Future` per request, so
the replay loop waits on Ray and on threads alike, and this module never imports Ray.

The request an actor receives is the trace line's dict (`TraceRequest.to_dict()`); the result it
returns is a dict:

    {"request_id": str, "tokens": int (new tokens), "t_first_token_s": float, "t_total_s": float,
     "mean_accepted_length": float | None, "error": str | None, ...any other fields (kept in `extra`)}

with both times measured by the actor from when it started the request.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field

import numpy as np

from actors.arrivals import Arrivals, make_arrivals
from actors.trace import TraceLineError, TraceRequest

RESULT_FIELDS = ("request_id", "tokens", "t_first_token_s", "t_total_s", "mean_accepted_length", "error")


@dataclass
class RequestRecord:
    """What happened to one request. Times are seconds from the start of the replay."""
    request_id: str
    workload: str | None
    arrival_s: float | None = None  # when the arrival process let it go
    sent_s: float | None = None  # when it reached an actor (later than arrival_s if it waited for its previous turn)
    done_s: float | None = None
    actor: int | None = None
    ok: bool = False
    error: str | None = None
    latency_s: float | None = None  # sent -> result, the actor's own queue included
    ttft_s: float | None = None  # sent -> first token: latency minus what the actor spent after its first token
    tokens: int | None = None
    tokens_per_s: float | None = None  # tokens / the actor's t_total_s: decoding speed, not counting its queue
    mean_accepted_length: float | None = None
    extra: dict = field(default_factory=dict)  # the result's other fields (head version, drafted, ...)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    request_id: str
    actor: int
    done_at: float  # time.monotonic() when the future completed
    result: object
    error: str | None


def one_line_error(err: BaseException) -> str:
    """`RuntimeError: boom` for an exception raised in an actor (Ray wraps it with a remote traceback)."""
    cause = getattr(err, "cause", None)  # RayTaskError keeps the actor's own exception here
    if isinstance(cause, BaseException):
        err = cause
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def read_result(result, request_id: str) -> str | None:
    """The problem with an actor's result dict in one line, or None when it is a successful result."""
    if not isinstance(result, dict):
        return f"actor returned {type(result).__name__}, expected a result dict"
    missing = [key for key in RESULT_FIELDS if key not in result]
    if missing:
        return f"actor's result lacks {', '.join(missing)}"
    if result["error"]:
        return str(result["error"]).strip().splitlines()[0]
    if result["request_id"] != request_id:
        return f"actor answered request {result['request_id']} instead"
    tokens = result["tokens"]
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        return f"result tokens must be a count of new tokens >= 0, got {tokens!r}"
    for key in ("t_first_token_s", "t_total_s"):
        if isinstance(result[key], bool) or not isinstance(result[key], (int, float)) or result[key] < 0:
            return f"result {key} must be seconds >= 0, got {result[key]!r}"
    return None


def _stamp_done(future: Future) -> None:
    future.dvi_done_at = time.monotonic()


class Dispatcher:
    """Sends each request to the actor with the fewest outstanding requests; ties go to the actor given
    the fewest requests so far, then the lowest index (deterministic, and idle actors take turns)."""

    def __init__(self, actors):
        if not actors:
            raise ValueError("a dispatcher needs at least one actor")
        self._pools: list[ThreadPoolExecutor] = []
        self._calls = [self._caller(i, actor) for i, actor in enumerate(actors)]
        self.outstanding = [0] * len(actors)
        self.assigned = [0] * len(actors)
        self._futures: dict[Future, tuple[str, int]] = {}

    def _caller(self, index: int, actor):
        generate = getattr(actor, "generate", None)
        if generate is not None and hasattr(generate, "remote"):
            return lambda request: generate.remote(request).future()
        if callable(actor):
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dvi-actor-{index}")
            self._pools.append(pool)
            return lambda request: pool.submit(actor, request)
        raise TypeError(f"actor {index} ({type(actor).__name__}) has no .generate.remote and is not callable")

    def least_loaded(self) -> int:
        return min(range(len(self._calls)), key=lambda i: (self.outstanding[i], self.assigned[i], i))

    @property
    def in_flight(self) -> int:
        return len(self._futures)

    def submit(self, request: dict, actor: int | None = None) -> int:
        """Send `request` (to `actor`, or the least-loaded one); returns the actor's index."""
        index = self.least_loaded() if actor is None else actor
        try:
            future = self._calls[index](request)
        except Exception as err:  # e.g. Ray could not ship the request: a failed request, not a failed replay
            future = Future()
            future.set_exception(err)
        self._futures[future] = (request["request_id"], index)
        # Stamped when the result arrives, not when the replay loop gets round to it: latency stays honest
        # while the loop is busy sending. (On the future itself: a callback may run after wait() returned.)
        future.add_done_callback(_stamp_done)
        self.outstanding[index] += 1
        self.assigned[index] += 1
        return index

    def wait(self, timeout_s: float | None = None) -> list[Completion]:
        """Completions that arrived within timeout_s (None: block until at least one)."""
        if not self._futures:
            if timeout_s:
                time.sleep(timeout_s)
            return []
        done, _ = wait(list(self._futures), timeout=timeout_s, return_when=FIRST_COMPLETED)
        completions = []
        for future in done:
            request_id, index = self._futures.pop(future)
            self.outstanding[index] -= 1
            try:
                result, error = future.result(), None
            except Exception as err:
                result, error = None, one_line_error(err)
            done_at = getattr(future, "dvi_done_at", None) or time.monotonic()
            completions.append(Completion(request_id, index, done_at, result, error))
        return sorted(completions, key=lambda c: (c.done_at, c.request_id))

    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)


def _previous_turns(requests: list[TraceRequest]) -> tuple[dict[str, str], dict[str, str]]:
    """request_id -> the request_id of its conversation's previous turn, and requests that can never be
    served because that turn is missing or comes later in dispatch order (waiting for it could deadlock)."""
    position = {(r.conversation_id, r.turn): (i, r.request_id) for i, r in enumerate(requests) if r.conversation_id}
    previous, invalid = {}, {}
    for i, r in enumerate(requests):
        if r.turn == 0:
            continue
        found = position.get((r.conversation_id, r.turn - 1))
        if found is None:
            invalid[r.request_id] = f"turn {r.turn - 1} of conversation {r.conversation_id} is not in the trace"
        elif found[0] > i:
            invalid[r.request_id] = f"comes before turn {r.turn - 1} of conversation {r.conversation_id} in arrival order"
        else:
            previous[r.request_id] = found[1]
    return previous, invalid


def replay(requests: list[TraceRequest], arrivals: Arrivals, dispatcher: Dispatcher, on_record=None) -> list[RequestRecord]:
    """Send the requests in list order, each when `arrivals` lets it go; a later turn of a conversation
    waits for its previous turn and goes to the same actor (which fills in its own earlier answers).
    Returns one record per request, in list order: a failed request is recorded with its error, never
    dropped. `on_record(record)` is called as each request finishes (live progress)."""
    if len({r.request_id for r in requests}) != len(requests):
        raise ValueError("replay needs unique request ids")
    records = {r.request_id: RequestRecord(r.request_id, r.workload) for r in requests}
    previous, invalid = _previous_turns(requests)
    held: dict[str, list[TraceRequest]] = {}  # previous turn's id -> later turns waiting for it
    queue = deque(requests)
    start = time.monotonic()

    def now() -> float:
        return time.monotonic() - start

    def dispatch(request: TraceRequest, actor: int | None) -> None:
        record = records[request.request_id]
        record.sent_s = now()
        record.actor = dispatcher.submit(request.to_dict(), actor)

    def finish(record: RequestRecord, error: str | None, t: float) -> None:
        record.done_s, record.error, record.ok = t, error, error is None
        arrivals.done(t)
        if on_record is not None:
            on_record(record)
        for later in held.pop(record.request_id, []):
            if record.ok:
                dispatch(later, record.actor)
            else:
                finish(records[later.request_id], f"its previous turn {record.request_id} failed", t)

    def send(request: TraceRequest, scheduled_s: float) -> None:
        record = records[request.request_id]
        record.arrival_s = scheduled_s
        arrivals.sent(now())
        before = previous.get(request.request_id)
        if request.request_id in invalid:
            finish(record, invalid[request.request_id], now())
        elif before is not None and records[before].done_s is None:
            held.setdefault(before, []).append(request)
        elif before is not None and not records[before].ok:
            finish(record, f"its previous turn {before} failed", now())
        else:
            dispatch(request, records[before].actor if before is not None else None)

    def complete(c: Completion) -> None:
        record = records[c.request_id]
        done_s = c.done_at - start
        record.latency_s = done_s - record.sent_s
        error = c.error or read_result(c.result, c.request_id)
        if error is None:
            result = c.result
            record.tokens = result["tokens"]
            record.ttft_s = record.latency_s - (result["t_total_s"] - result["t_first_token_s"])
            record.tokens_per_s = result["tokens"] / result["t_total_s"] if result["t_total_s"] > 0 else None
            record.mean_accepted_length = result["mean_accepted_length"]
            record.extra = {k: v for k, v in result.items() if k not in RESULT_FIELDS}
        finish(record, error, done_s)

    while queue or dispatcher.in_flight:
        next_at = arrivals.next_at() if queue else None
        if next_at is not None and next_at <= now():
            send(queue.popleft(), next_at)
            continue
        if not dispatcher.in_flight and next_at is None:
            break  # the arrival process let nothing more go: the rest are recorded below
        timeout = None if next_at is None else max(0.0, next_at - now())
        for completion in dispatcher.wait(timeout):
            complete(completion)
    for record in records.values():
        if record.done_s is None:
            record.error = "not sent: the arrival process ended before this request"
    return [records[r.request_id] for r in requests]


def replay_trace(requests: list[TraceRequest], arrival_spec, dispatcher: Dispatcher, seed: int = 0,
                 on_record=None) -> list[RequestRecord]:
    """Replay in arrival order under an arrival spec (`recorded`, `poisson`, `closed_loop`, ...)."""
    ordered = sorted(requests, key=lambda r: r.arrival_s)  # stable: equal times keep the trace's order
    arrivals = make_arrivals(arrival_spec, [r.arrival_s for r in ordered], np.random.default_rng(seed))
    return replay(ordered, arrivals, dispatcher, on_record)


def line_error_records(errors: list[TraceLineError]) -> list[RequestRecord]:
    """Bad trace lines as failed records, so a run reports them with the requests it served."""
    return [RequestRecord(e.request_id or f"{e.path}:{e.line}", None, error=str(e)) for e in errors]
