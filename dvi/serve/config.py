"""Typed settings of `dvi serve` (configs/serve.yaml): a `dvi run` system (model, actors as replicas, learner,
Redis, stream) with an HTTP endpoint in place of a trace."""
from __future__ import annotations

import os

from pydantic import Field, SecretStr

from dvi.run.config import SystemConfig
from selfspec.config import Strict
from selfspec.model_facts import model_name

API_KEY_ENV = "DVI_API_KEY"


class EndpointConfig(Strict):
    host: str = Field("127.0.0.1", description="address to bind; anything but loopback without an API key "
                                               "prints a warning")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    api_key: SecretStr | None = Field(None, description=f"clients must send `Authorization: Bearer <key>`; "
                                                        f"null: ${API_KEY_ENV} if set, else no key")
    served_model_name: str | None = Field(None, description="the `model` clients send; null: the model's name")
    max_ongoing_requests: int = Field(8, ge=1, description="requests a replica holds at once (it decodes up to "
                                                           "actors.max_batch together, the rest wait in order)")
    max_queued_requests: int = Field(16, ge=-1, description="requests waiting for a replica beyond those; more "
                                                            "get 503 with Retry-After (-1: no limit)")
    drain_timeout_s: float = Field(30.0, ge=0, description="on Ctrl-C or SIGTERM, in-flight requests get this "
                                                           "long to finish")
    collect_every_s: float = Field(2.0, gt=0, description="how often finished requests are appended to "
                                                          "requests.jsonl")

    def key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        return os.environ.get(API_KEY_ENV) or None


class ServeConfig(SystemConfig):
    out_dir: str = Field("runs/serve", description="the run directory: requests.jsonl, metrics.jsonl, learner/, "
                                                   "summary.json and report.md at shutdown")
    serve: EndpointConfig = Field(EndpointConfig(), description="the HTTP endpoint: address, API key, queue bounds, "
                                                               "drain")

    def secrets(self) -> dict:
        return {**super().secrets(), "serve": {"api_key"}}

    @property
    def served_name(self) -> str:
        return self.serve.served_model_name or model_name(self.model)
