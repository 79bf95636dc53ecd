"""The HTTP face of `dvi serve`: a FastAPI app inside a Ray Serve deployment, speaking the OpenAI API.

It checks the key, parses and validates the request (dvi.serve.protocol), applies the chat template and
checks the prompt against the model's context, then streams from a generation replica through a
DeploymentHandle. TTFT and end-to-end latency are measured here, where the client sees them.
Every finished request is also kept as a record that `dvi serve` collects into requests.jsonl.
"""

import json
import secrets
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayError
from ray.serve.exceptions import BackPressureError

from dvi.serve import protocol as api
from dvi.serve.metrics import CONTENT_TYPE_LATEST, ServeMetrics

app = FastAPI(title="dvi", description="OpenAI-compatible endpoint of dvi: lossless self-speculative decoding "
                                       "with a drafter that learns from every request it answers")
RETRY_AFTER_S = "1"


@dataclass(frozen=True)
class IngressSettings:
    served_name: str  # the `model` clients send, and /v1/models lists
    model_dir: str  # where the tokenizer is
    max_positions: int
    api_key: str | None = None


@dataclass
class Reply:
    """An answer under way: its id, the parsed request, the replica's stream, and when it started (and its
    first token came), in time.perf_counter() seconds."""
    rid: str
    body: object  # api.ChatRequest or api.CompletionRequest
    chat: bool
    calls: object  # the DeploymentResponseGenerator of the replica's `generate`
    start: float
    ttft: float


@app.exception_handler(api.APIError)
async def _api_error(request: Request, err: api.APIError):
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, generation, settings: dict):
        from transformers import AutoTokenizer

        self.generation = generation
        self.settings = IngressSettings(**settings)
        self.tokenizer = AutoTokenizer.from_pretrained(self.settings.model_dir)
        self.metrics = ServeMetrics(self.settings.served_name)
        self.records: list = []  # finished requests not yet collected by `dvi serve`
        self.replicas: dict = {}  # replica id -> its counters, as its latest answer carried them
        self.in_flight = 0
        self.draining = False
        self.started = time.time()

    # -- routes -----------------------------------------------------------------------------------

    @app.get("/health")
    def health(self):
        return {"status": "ok"}

    @app.get("/v1/models")
    def models(self, request: Request):
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.settings.served_name, "object": "model",
                                            "created": int(self.started), "owned_by": "dvi",
                                            "max_model_len": self.settings.max_positions}]}

    @app.get("/metrics")
    def prometheus(self):
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._complete(request, chat=False)

    # -- for `dvi serve` (through the app's handle) -------------------------------------------------

    def collect(self) -> list[dict]:
        """The records finished since the last call (`dvi serve` appends them to requests.jsonl)."""
        out, self.records = self.records, []
        return out

    def replica_metrics(self) -> dict[int, dict]:
        return self.replicas

    def drain(self) -> None:
        """From now on new requests get 503: the server is shutting down."""
        self.draining = True

    def running(self) -> int:
        return self.in_flight

    # -- one request ------------------------------------------------------------------------------

    async def _complete(self, request: Request, chat: bool):
        self.in_flight += 1
        self.metrics.running.labels(self.metrics.model).set(self.in_flight)
        streaming = False
        try:
            response = await self._answer(request, chat)
            streaming = isinstance(response, StreamingResponse)  # its stream counts itself out when it ends
            return response
        finally:
            if not streaming:
                self._done()

    async def _answer(self, request: Request, chat: bool):
        start = time.perf_counter()
        try:
            if self.draining:
                raise api.APIError(503, "the server is shutting down", "server_shutting_down",
                                   headers={"Retry-After": RETRY_AFTER_S})
            self._authorize(request)
            body = await self._parse(request, api.ChatRequest if chat else api.CompletionRequest)
            if body.model != self.settings.served_name:
                raise api.APIError(404, f"the model `{body.model}` does not exist: this server serves "
                                        f"`{self.settings.served_name}`", "model_not_found", "model")
            job = self._job(body, chat)
            calls = self.generation.options(stream=True).generate.remote(job)
            try:  # the first chunk (prefill done) before answering: a full queue is still a status code
                first = await calls.__anext__()
            except BackPressureError:  # never reached a replica: nothing to cancel
                raise api.APIError(503, "the server is at capacity: every replica's queue is full, retry later",
                                   "server_busy", headers={"Retry-After": RETRY_AFTER_S}) from None
            except RayError as err:
                raise _replica_error(err) from None
            ttft = time.perf_counter() - start
            failed = (first.get("result") or {}).get("error")
            if failed:  # the worker refused the request (it reports, never raises)
                raise api.APIError(400 if failed.startswith("ValueError") else 500, failed,
                                   "invalid_request" if failed.startswith("ValueError") else "internal_error")
        except api.APIError as err:
            self.metrics.error(err.status)
            raise
        reply = Reply(api.completion_id(chat), body, chat, calls, start, ttft)
        if body.stream:
            return StreamingResponse(self._sse(reply, first), media_type="text/event-stream")
        text, result = first.get("text", ""), first.get("result")
        try:
            async for chunk in calls:
                text += chunk.get("text", "")
                result = chunk.get("result", result)
        except RayError as err:
            error = _replica_error(err)
            self.metrics.error(error.status)
            raise error from None
        finally:
            if result is None:  # cancelled (the client left) or failed: stop the decode
                calls.cancel()
        self._finished(result, ttft, start)
        return api.response_object(chat, reply.rid, body.model, text, result)

    async def _sse(self, reply: "Reply", first: dict):
        def event(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        def chunk_of(text: str | None, **kw) -> dict:
            return api.chunk_object(reply.chat, reply.rid, reply.body.model, text, **kw)

        result, calls = None, reply.calls
        try:
            if reply.chat:
                yield event(chunk_of(None, role=True))
            chunk = first
            while True:
                if chunk.get("text"):
                    yield event(chunk_of(chunk["text"]))
                if "result" in chunk:
                    result = chunk["result"]
                    break
                chunk = await calls.__anext__()
            self._finished(result, reply.ttft, reply.start)
            yield event(chunk_of(None, finish=result["finish_reason"]) | {"dvi": api.dvi_fields(result)})
            if reply.body.include_usage:
                yield event({**chunk_of(None), "choices": [], "usage": api.usage(result)})
        except Exception as err:  # noqa: BLE001  after the 200: the error travels as an event
            error = _replica_error(err)
            self.metrics.error(error.status)
            yield event(error.body())
        finally:
            self._done()
            if result is None:  # the client left (or the decode failed): free the replica
                calls.cancel()
        yield "data: [DONE]\n\n"

    def _done(self) -> None:
        self.in_flight -= 1
        self.metrics.running.labels(self.metrics.model).set(self.in_flight)

    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise api.APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                               "invalid_api_key")

    async def _parse(self, request: Request, model):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise api.APIError(400, f"malformed JSON body: {err}", "invalid_json") from None
        if not isinstance(data, dict):
            raise api.APIError(400, "the body must be a JSON object", "invalid_json")
        try:
            return model.model_validate(data)
        except ValidationError as err:
            raise api.validation_error(err) from None

    def _job(self, body, chat: bool) -> dict:
        """The replica's request: token ids that fit the context with the tokens asked for."""
        from selfspec.prompts import messages_ids

        if chat:
            ids = messages_ids(self.tokenizer, [m.turn() for m in body.messages])
        elif isinstance(body.prompt, str):
            ids = list(self.tokenizer(body.prompt)["input_ids"])
        else:
            ids = list(body.prompt)
            vocab = len(self.tokenizer)
            if any(not 0 <= i < vocab for i in ids):
                raise api.APIError(400, f"prompt: token ids must be in [0, {vocab})", "invalid_request", "prompt")
        context = self.settings.max_positions
        asked = body.token_limit
        if len(ids) >= context or (asked is not None and len(ids) + asked > context):
            raise api.APIError(400, f"the prompt has {len(ids)} tokens and max_tokens asks for {asked or 1} more: "
                                    f"{len(ids) + (asked or 1)} exceeds the model's context of {context} tokens",
                               "context_length_exceeded", "max_tokens" if asked else "messages" if chat else "prompt")
        return {"request_id": f"serve-{secrets.token_hex(6)}", "prompt_ids": ids,
                "max_new_tokens": asked if asked is not None else context - len(ids),
                "temperature": body.temperature, "seed": body.seed, "stop": body.stop, "workload": "serve"}

    def _finished(self, result: dict, ttft: float, start: float) -> None:
        e2e = time.perf_counter() - start
        self.metrics.finished(result, ttft, e2e)
        self.replicas[result["actor_id"]] = result["replica_metrics"]
        self.records.append({"request_id": result["request_id"], "workload": "serve", "done_s": time.time() - self.started,
                             "actor": result.get("actor_id"), "ok": True, "latency_s": e2e, "ttft_s": ttft,
                             "tokens": result["tokens"], "tokens_per_s": result["tokens"] / max(result["t_total_s"], 1e-9),
                             "mean_accepted_length": result.get("mean_accepted_length"),
                             "extra": {k: result.get(k) for k in ("head_version", "drafted", "accepted", "finish_reason",
                                                                  "prompt_tokens")}})


def _replica_error(err: Exception) -> api.APIError:
    """A generation replica that died (Serve starts another: retry) or failed on this request."""
    if isinstance(err, (ActorDiedError, ActorUnavailableError)):
        return api.APIError(503, "the generation replica serving this request stopped; Serve is starting another, "
                                 "retry", "replica_unavailable", headers={"Retry-After": RETRY_AFTER_S})
    lines = str(getattr(err, "cause", None) or err).strip().splitlines()
    return api.APIError(500, f"{type(err).__name__}: {lines[0] if lines else ''}", "internal_error")
