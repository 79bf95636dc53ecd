"""Open a Redis client and turn every way of failing to reach Redis into one line that says what to do."""
from __future__ import annotations

import socket
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

START_HINT = "run `dvi redis start`"


def safe_url(url: str) -> str:
    """The URL without credentials, fit for messages and logs; ValueError if it is not a redis:// URL."""
    parts = urlsplit(url)
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"redis url {url!r}: the port is not a number") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"redis url {url!r}: expected redis://HOST:PORT")
    return f"{parts.scheme}://{parts.hostname}:{port}{parts.path}"


def connect(url: str, password: str | None = None, *, timeout_s: float = 2.0,
            password_env: str = "DVI_REDIS_PASSWORD") -> redis.Redis:
    """A client that has answered PING; ConnectionError (one line, with the remedy) otherwise."""
    where = safe_url(url)
    # PING through a probe that times out reads too; the returned client blocks as long as a command
    # asks (XREADGROUP BLOCK, large GETs), so it has no read timeout.
    probe = _client(url, password, timeout_s, read_timeout_s=timeout_s)
    try:
        probe.ping()
    except redis.AuthenticationError:
        problem = "refused the password" if password else "needs a password"
        raise ConnectionError(f"redis at {where} {problem}: set {password_env} to the server's password") from None
    except redis.ResponseError as err:
        raise ConnectionError(f"redis at {where} answered PING with an error: {err}") from None
    except redis.TimeoutError:
        raise ConnectionError(f"redis at {where} did not answer within {timeout_s:g}s: check the host, port "
                              "and firewall") from None
    except redis.ConnectionError as err:
        raise ConnectionError(_describe(err, where, urlsplit(url).hostname)) from None
    except redis.RedisError as err:  # e.g. InvalidResponse: something else listens on that port
        raise ConnectionError(f"something at {where} answered but is not Redis ({type(err).__name__}): "
                              "check the port") from None
    finally:
        probe.close()
    return _client(url, password, timeout_s, read_timeout_s=None)


def _client(url: str, password: str | None, connect_timeout_s: float, read_timeout_s: float | None) -> redis.Redis:
    # a few quick retries ride out a server restart without hiding a server that is gone
    return redis.Redis.from_url(url, password=password, socket_connect_timeout=connect_timeout_s,
                                socket_timeout=read_timeout_s, retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2))


def _describe(err: redis.ConnectionError, where: str, host: str) -> str:
    cause = err.__context__
    if isinstance(cause, ConnectionRefusedError):
        local = host in ("localhost", "127.0.0.1", "::1")
        return f"no redis server at {where} (connection refused): " + (
            START_HINT if local else "check that redis runs on that host and port")
    if isinstance(cause, socket.gaierror):
        return f"cannot resolve the host {host!r} of redis url {where}: check the URL"
    if isinstance(cause, (TimeoutError, socket.timeout)):
        return f"redis at {where} is unreachable (timed out): check the host, port and firewall"
    if isinstance(cause, OSError):
        return f"redis at {where} is unreachable ({cause.strerror or cause}): check the host, port and firewall"
    return f"lost the connection to redis at {where} ({err}): is it still running? {START_HINT}"
