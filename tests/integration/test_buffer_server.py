"""The redis-server launcher, crash durability, connection errors and `dvi redis`, all with real processes."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from buffer.config import RedisConfig, StreamConfig
from buffer.connection import connect
from buffer.server import RedisServer, free_port, redis_pid_alive
from buffer.stream import TransitionReader, TransitionWriter
from buffer.weights import WeightStore
from dvi import cli
from dvi.config import ConfigError, load_config
from buffer.synthetic import random_transition
from learner.config import LearnerConfig

REPO = Path(__file__).resolve().parents[2]


def _wait_gone(pid: int, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while redis_pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not redis_pid_alive(pid)


def test_data_written_a_second_before_sigkill_survives_restart(tmp_path):
    rng = np.random.default_rng(0)
    sent = [random_transition(rng, n=4, d=64, k=8, request_id=f"q{i}") for i in range(50)]
    head = {"w": rng.standard_normal((8, 8), np.float32)}
    cfg = RedisConfig(persistence=True)
    server = RedisServer(cfg, tmp_path / "redis").start()
    client = server.client()
    with TransitionWriter(client, "run", StreamConfig(frame_size=8)) as writer:
        for t in sent:
            writer.write(t)
    WeightStore(client, "run").publish(7, head, {"base_model": "m"})
    time.sleep(1.5)  # appendfsync everysec: the contract covers data older than one second
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    server.stop()

    with RedisServer(cfg, tmp_path / "redis") as again:
        client = again.client()
        reader = TransitionReader(client, "run", StreamConfig(frame_size=8, batch_size=64))
        with reader.batch(block_ms=0) as batch:
            assert sorted(t.transition_id for t in batch.transitions) == sorted(t.transition_id for t in sent)
        version, arrays, _ = WeightStore(client, "run").pull_if_newer(None)
        assert version == 7 and np.array_equal(arrays["w"], head["w"])


def test_server_dies_when_its_parent_is_killed(tmp_path):
    code = ("import sys, time\nfrom buffer.config import RedisConfig\nfrom buffer.server import RedisServer\n"
            "s = RedisServer(RedisConfig(persistence=False), sys.argv[1]).start()\nprint(s.pid, flush=True)\n"
            "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    assert redis_pid_alive(pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert _wait_gone(pid), "redis-server outlived the process that started it"


def test_password_is_required_and_never_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DVI_REDIS_PASSWORD", "s3cret pass")
    with RedisServer(RedisConfig(persistence=False), tmp_path) as server:
        assert server.client().ping()
        assert b"s3cret" not in Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert not any(b"s3cret" in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
        with pytest.raises(ConnectionError) as wrong:
            connect(server.url, "guess")
        with pytest.raises(ConnectionError) as missing:
            connect(server.url, None)
    assert str(wrong.value) == f"redis at {server.url} refused the password: set DVI_REDIS_PASSWORD to the server's password"
    assert str(missing.value).endswith("needs a password: set DVI_REDIS_PASSWORD to the server's password")


def test_no_server_and_unreachable_urls_give_one_line_each():
    port = free_port("127.0.0.1")
    with pytest.raises(ConnectionError, match=r"^no redis server at redis://127.0.0.1:\d+ .*run `dvi redis start`"):
        connect(f"redis://127.0.0.1:{port}")
    with pytest.raises(ConnectionError, match="cannot resolve the host 'no-such-host.invalid'"):
        connect("redis://no-such-host.invalid:6390")
    with pytest.raises(ValueError, match="expected redis://HOST:PORT"):
        connect("http://127.0.0.1:80")
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(ConnectionError, match="did not answer within 0.3s: check the host, port and firewall"):
            connect(f"redis://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.3)


def test_something_else_on_the_port_is_named(tmp_path):
    with socket.socket() as web:
        web.bind(("127.0.0.1", 0))
        web.listen()

        def answer_like_http():
            conn, _ = web.accept()
            conn.recv(100)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.close()
        threading.Thread(target=answer_like_http, daemon=True).start()
        with pytest.raises(ConnectionError, match="answered but is not Redis"):
            connect(f"redis://127.0.0.1:{web.getsockname()[1]}")


def test_memory_backstop_fails_writes_instead_of_evicting(tmp_path):
    with RedisServer(RedisConfig(persistence=False, maxmemory_mb=4), tmp_path) as server:
        client = server.client()
        with pytest.raises(redis.ResponseError, match="used memory > 'maxmemory'"):
            for i in range(20):  # 10 MB in all, well past the 4 MB limit
                client.set(f"k{i}", bytes(512 * 1024))
        assert 0 < i < 19 and all(client.exists(f"k{j}") for j in range(i))  # nothing evicted


def test_external_url_is_only_checked_not_started(tmp_path, redis_server):
    external = RedisServer(RedisConfig(url=redis_server.url), tmp_path / "unused").start()
    assert external.pid is None and external.client().ping()
    external.stop()
    assert redis_server.client().ping()  # stopping an external server leaves it running
    redis_server.stop()
    with pytest.raises(ConnectionError, match="run `dvi redis start`"):
        RedisServer(RedisConfig(url=redis_server.url), tmp_path / "unused").start()


def test_taken_port_and_bad_config_are_clear(tmp_path, redis_server):
    with pytest.raises(ConnectionError, match=f"port {redis_server.port} is in use"):
        RedisServer(RedisConfig(port=redis_server.port, persistence=False), tmp_path / "other").start()
    with pytest.raises(ValueError, match="belongs to Ray"):
        RedisConfig(port=6379)
    # the stream section as the learner's and the run's configs read it (dvi.config.load_config)
    with pytest.raises(ConfigError, match=r"^config: stream\.maxlen: Input should be greater than 0$"):
        load_config(LearnerConfig, None, {"stream.maxlen": 0})
    with pytest.raises(ConfigError, match=r"^config: stream\.backpresure: Extra inputs are not permitted"):
        load_config(LearnerConfig, None, {"stream.backpresure": "block"})
    with pytest.raises(ValueError, match="set DVI_REDIS_PASSWORD"):
        RedisServer(RedisConfig(bind="0.0.0.0"), tmp_path / "open").start()


def _dvi(capsys, monkeypatch, *argv) -> tuple[int, str]:
    # only this package's subcommands: the others are built elsewhere and may not import yet
    monkeypatch.setattr(cli, "COMMANDS", {"redis": "dvi.cli.redis"})
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, (out.out + out.err).strip()


def test_dvi_redis_start_status_stop(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DVI_REDIS_PASSWORD", raising=False)
    state = str(tmp_path / "redis")
    code, out = _dvi(capsys, monkeypatch, "redis", "status", "--dir", state)
    assert code == 1 and out == f"redis: not running (no live server recorded in {state}): run `dvi redis start`"
    code, url = _dvi(capsys, monkeypatch, "redis", "start", "--dir", state, "--port", "0")
    try:
        assert code == 0 and connect(url).ping()
        code, out = _dvi(capsys, monkeypatch, "redis", "status", "--dir", state)
        assert code == 0 and out.startswith(f"redis: running at {url}") and "AOF everysec" in out
        code, out = _dvi(capsys, monkeypatch, "redis", "start", "--dir", state, "--port", "0")
        assert code == 2 and out.startswith(f"dvi redis: error: already running at {url}")
    finally:
        code, out = _dvi(capsys, monkeypatch, "redis", "stop", "--dir", state)
    assert code == 0 and out.startswith("redis: stopped")
    with pytest.raises(ConnectionError, match="run `dvi redis start`"):
        connect(url)
    code, out = _dvi(capsys, monkeypatch, "redis", "start", "--dir", state, "--port", "6379")
    assert code == 2 and out.count("\n") == 0 and "6379 belongs to Ray" in out
