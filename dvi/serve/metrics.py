"""What `GET /metrics` shows, in the Prometheus text format (prometheus_client).

The speculative-decoding counters are named as vLLM names them (`vllm:spec_decode_*` there, `dvi:` here),
so dashboards built for one read the other. They are counted from each finished request's own numbers,
which the generation replica sends with its last chunk; the replica-wide values (head version,
transitions written and dropped) arrive the same way and are kept per replica.
"""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,  # noqa: F401
                               disable_created_metrics, generate_latest)

disable_created_metrics()  # `_created` timestamps per series double the page and no dashboard reads them

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class ServeMetrics:
    def __init__(self, model: str):
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.model = model
        self.drafts = Counter("dvi:spec_decode_num_drafts", "Rounds that verified at least one draft", labels, registry=r)
        self.draft_tokens = Counter("dvi:spec_decode_num_draft_tokens", "Draft tokens verified", labels, registry=r)
        self.accepted_tokens = Counter("dvi:spec_decode_num_accepted_tokens", "Draft tokens accepted", labels, registry=r)
        self.accepted_per_pos = Counter("dvi:spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted at each draft position", labels + ["position"], registry=r)
        self.generation_tokens = Counter("dvi:generation_tokens", "Tokens generated", labels, registry=r)
        self.prompt_tokens = Counter("dvi:prompt_tokens", "Prompt tokens prefilled", labels, registry=r)
        self.requests = Counter("dvi:request_success", "Finished requests by finish reason", labels + ["finished_reason"],
                                registry=r)
        self.errors = Counter("dvi:request_errors", "Requests answered with an error, by HTTP status",
                              labels + ["status"], registry=r)
        self.ttft = Histogram("dvi:time_to_first_token_seconds", "Time to first token, as the ingress sees it",
                              labels, buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("dvi:e2e_request_latency_seconds", "End-to-end request latency", labels,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("dvi:num_requests_running", "Requests the ingress is serving now", labels, registry=r)
        replica = labels + ["replica"]
        self.head_version = Gauge("dvi:head_version", "Drafter head version in use (-1: the starting head)", replica,
                                  registry=r)
        self.transitions_written = Gauge("dvi:transitions_written", "Transitions the replica wrote to the stream",
                                         replica, registry=r)
        self.transitions_dropped = Gauge("dvi:transitions_dropped", "Transitions the replica dropped (backpressure)",
                                         replica, registry=r)
        self.abandoned = Gauge("dvi:requests_abandoned", "Requests whose client left before the end (decoding "
                                                         "stopped after the round in progress)", replica, registry=r)

    def finished(self, stats: dict, ttft_s: float | None, e2e_s: float) -> None:
        """One request done: `stats` is the replica's record of it (GenerationWorker's result, with the
        replica's counters as `replica_metrics`)."""
        m = self.model
        self.drafts.labels(m).inc(stats.get("draft_rounds") or 0)
        self.draft_tokens.labels(m).inc(stats.get("drafted") or 0)
        self.accepted_tokens.labels(m).inc(stats.get("accepted") or 0)
        for position, accepted in enumerate(stats.get("accepted_per_pos") or []):
            self.accepted_per_pos.labels(m, str(position)).inc(accepted)
        self.generation_tokens.labels(m).inc(stats.get("tokens") or 0)
        self.prompt_tokens.labels(m).inc(stats.get("prompt_tokens") or 0)
        self.requests.labels(m, stats.get("finish_reason") or "unknown").inc()
        if ttft_s is not None:
            self.ttft.labels(m).observe(ttft_s)
        self.e2e.labels(m).observe(e2e_s)
        counters, replica = stats.get("replica_metrics") or {}, str(stats.get("actor_id", "?"))
        version = counters.get("head_version")
        self.head_version.labels(m, replica).set(-1 if version is None else version)
        self.transitions_written.labels(m, replica).set(counters.get("transitions_written", 0))
        self.transitions_dropped.labels(m, replica).set(counters.get("transitions_dropped", 0))
        self.abandoned.labels(m, replica).set(counters.get("requests_abandoned", 0))

    def error(self, status: int) -> None:
        self.errors.labels(self.model, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
