"""A whole `dvi run` on a tiny model: a model directory (tiny Llama + byte tokenizer), a trace file and a
run config, for the tests that drive the real CLI through Ray, Redis and DeepSpeed."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml
from tiny_model import byte_tokenizer, tiny_llama

from dvi.config import set_dotted

REPO = Path(__file__).resolve().parents[1]
DVI = str(Path(sys.executable).parent / "dvi")
WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]


def dvi_env() -> dict:
    env = dict(os.environ)
    env.setdefault("DVI_THIN_GEMM_ROWS", "none")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dvi" / "torch_extensions"))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def request(i: int, workload: str, arrival_s: float = 0.0, max_new_tokens: int = 16, **fields) -> dict:
    text = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(4))
    return {"arrival_s": arrival_s, "request_id": f"r{i:04d}", "workload": workload, "prompt": text,
            "max_new_tokens": max_new_tokens, "temperature": 0.0, **fields}


def write_run(tmp: Path, rows: list, **overrides) -> Path:
    """Model, trace (rows are dicts, or raw strings for malformed lines) and config; returns the config path."""
    model_dir = tmp / "model"
    if not model_dir.exists():
        tiny_llama(seed=3, max_positions=96).float().save_pretrained(model_dir)
        byte_tokenizer().save_pretrained(model_dir)
    trace = tmp / "trace.jsonl"
    trace.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    config = {
        "out_dir": str(tmp / "run"), "model": str(model_dir), "exit_layer": 1,
        "head": {"adapter_hidden": 64, "lora_rank": 4, "draft_vocab": None},
        "trace": {"path": str(trace), "workloads": ["chat", "code"]},
        "actors": {"count": 2, "gamma": 3, "num_cpus": 1, "weights_check_every_rounds": 8},
        "learner": {"draft_vocab_from": "lowest", "heldout": {"prompts": 0}, "batch_size": 16, "min_fill": 0.01,
                    "fill_timeout_s": 0.2, "publish_every_steps": 4, "publish_every_s": 2,
                    "deepspeed": str(REPO / "configs/deepspeed/zero1.json"),
                    "checkpoint": {"every_steps": 8, "every_s": 2}},
        "stream": {"frame_size": 4, "read_block_ms": 100},
        "metrics_every_s": 1, "drain_timeout_s": 20,
    }
    for key, value in overrides.items():
        set_dotted(config, key, value)
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def assert_png(path: Path) -> None:
    """A file that is there and reads as a whole PNG image."""
    from PIL import Image

    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_serve(tmp: Path, port: int, **overrides) -> Path:
    """A `dvi serve` config on the tiny model (the run's learner settings, one replica); returns its path."""
    run_config = yaml.safe_load(write_run(tmp, [request(0, "chat")]).read_text())
    config = {key: value for key, value in run_config.items() if key not in ("trace",)}
    config.update(out_dir=str(tmp / "serve"), serve={"port": port, "drain_timeout_s": 20, "collect_every_s": 0.5})
    config["actors"] = {**config["actors"], "count": 1}
    for key, value in overrides.items():
        set_dotted(config, key, value)
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class ServeProcess:
    """`dvi serve --config PATH` as a user runs it: started, waited for until it prints its URL, and stopped
    with SIGTERM (its drain); `output` holds what it printed, `code` its exit status."""

    def __init__(self, config: Path, *args: str, ready_timeout_s: float = 300):
        import subprocess
        import threading

        self.lines: list[str] = []
        self.url: str | None = None
        self.proc = subprocess.Popen([DVI, "serve", "--config", str(config), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=dvi_env(), cwd=REPO)
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if "dvi serve: ready at " in line:
                    self.url = line.split("ready at ")[1].split()[0]
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(ready_timeout_s) or self.url is None:
            self.stop()
            raise RuntimeError("dvi serve did not come up:\n" + self.output[-4000:])

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout_s: float = 300) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.code = self.proc.wait(timeout_s)
        except Exception:
            self.proc.kill()
            self.code = self.proc.wait()
        return self.code
