"""--device and --dtype on the CPU: how selfspec.device resolves them, its one-line errors, that
`--device cpu --dtype float32` decodes exactly as the defaults did, and what bench JSON records.
(The CUDA side is tests/gpu/test_gpu.py.)"""
from __future__ import annotations

import json

import pytest
import torch
from tiny_model import plain_greedy, save_tiny_model, tiny_llama, write_prompts

from dvi import cli
from selfspec.copy_sources import CopySources
from selfspec.device import DeviceError, decode_attention, resolve_device, resolve_dtype, synchronize
from selfspec.drafter import DrafterHead, HeadConfig
from selfspec.engine import SelfSpecDecoder
from selfspec.loading import DeviceSettings, load_model_parts
from selfspec.length_policy import LengthPolicy
from selfspec.split import SplitModel

NO_CUDA = not torch.cuda.is_available()
PROMPTS = ["Sort a list.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_resolve_device():
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    for bad in ("tpu", "gpu0", "meta"):
        with pytest.raises(DeviceError, match="cpu, cuda or cuda:N") as err:
            resolve_device(bad)
        assert "\n" not in str(err.value)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_is_one_clear_line(name):
    with pytest.raises(DeviceError, match=rf"--device {name}: CUDA is not available here .*use --device cpu") as err:
        resolve_device(name)
    assert "\n" not in str(err.value)


def test_resolve_dtype():
    dtype, reason = resolve_dtype("auto", "cpu")
    assert dtype == torch.float32 and reason.startswith("auto") and "CPU" in reason
    dtype, reason = resolve_dtype(None, torch.device("cuda"))  # a device object needs no GPU
    assert dtype == torch.float32 and "bfloat16 measured 2-5x slower" in reason
    assert resolve_dtype("bfloat16", "cpu") == (torch.bfloat16, "requested")
    assert resolve_dtype("float16", "cuda:0") == (torch.float16, "requested")
    assert resolve_dtype(torch.float64, "cpu") == (torch.float64, "requested")
    with pytest.raises(DeviceError, match="unknown dtype 'int8': choose one of auto, float32, bfloat16, float16"):
        resolve_dtype("int8", "cpu")


def test_synchronize_waits_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", calls.append)
    for device in (None, "cpu", torch.device("cpu")):
        synchronize(device)
    assert calls == []
    synchronize("cuda:0")
    synchronize(torch.device("cuda"))
    assert calls == ["cuda:0", torch.device("cuda")]


def test_explicit_cpu_float32_decodes_as_the_defaults_did(model_dir):
    """load_model_parts's defaults (what every command used before --device/--dtype) and an explicit
    cpu/float32 give the same model, and the same tokens as a plain greedy reference."""
    before = load_model_parts(str(model_dir), 2)
    explicit = load_model_parts(str(model_dir), 2, settings=DeviceSettings("cpu", "float32"))
    assert explicit.split.device == torch.device("cpu") and explicit.split.dtype == torch.float32
    assert before.dtype_reason == explicit.dtype_reason == "requested"
    for a, b in zip(before.model.state_dict().values(), explicit.model.state_dict().values()):
        assert torch.equal(a, b)
    prompt = [5, 9, 2, 30, 7, 7, 1]
    outputs = [SelfSpecDecoder(d.split, d.head, LengthPolicy(3), CopySources(ngram=1))
               .generate(prompt, max_new_tokens=20, eos_ids=set()).tokens for d in (before, explicit)]
    assert outputs[0] == outputs[1] == plain_greedy(before.model, prompt, 20)


def test_generate_command_with_device_and_dtype(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", {"generate": "dvi.cli.generate"})
    args = ["generate", "--model", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "12", "-k", "2",
            "--length-policy", "fixed"]
    assert cli.main(args) == 0
    plain = capsys.readouterr().out
    assert cli.main([*args, "--device", "cpu", "--dtype", "float32"]) == 0
    explicit = capsys.readouterr().out
    assert plain.split("\n[")[0] == explicit.split("\n[")[0]  # the text; the stats line holds timings
    assert "cpu float32" in explicit
    if NO_CUDA:
        assert cli.main([*args, "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("dvi generate: error: --device cuda: CUDA is not available")


def test_bench_records_device_and_dtype(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"bench": "dvi.cli.bench"})
    prompts = write_prompts(tmp_path / "q.jsonl", PROMPTS)
    out = tmp_path / "bench.json"
    base = ["bench", "--model", str(model_dir), "--prompts", str(prompts), "--n", "2", "--max-new-tokens", "8",
            "-k", "2", "--gamma", "3", "--methods", "hf_ar,hf_static,dvi_ar,dvi_spec_ngram", "--out", str(out)]
    assert cli.main([*base, "--device", "cpu", "--dtype", "float32"]) == 0
    report = json.loads(out.read_text())
    assert (report["device"], report["dtype"], report["dtype_reason"]) == ("cpu", "float32", "requested")
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["transformers"]
    assert [m["name"] for m in report["methods"]] == ["hf_ar", "hf_static", "dvi_ar", "dvi_spec_ngram"]
    assert all(m["identical_to_ar"] == 1.0 for m in report["methods"])
    assert report["passes"] == "eager"  # auto on the CPU
    spec = report["methods"][-1]
    assert spec["identical_to_dvi_ar"] == 1.0 and spec["divergences_from_dvi_ar"] == []
    if NO_CUDA:
        assert cli.main([*base, "--methods", "hf_ar"]) == 0  # no --device, no --dtype: the CPU, float32
        report = json.loads(out.read_text())
        assert (report["device"], report["dtype"]) == ("cpu", "float32") and report["dtype_reason"].startswith("auto")


def test_online_config_and_flags_carry_device_and_dtype():
    from dvi.config import ConfigError, load_config
    from dvi.cli.args import online_overrides as overrides
    from selfspec.online import OnlineConfig

    cfg = load_config(OnlineConfig, "configs/online.yaml")
    assert (cfg.device, cfg.dtype) == (None, "auto")
    args = cli.build_parser().parse_args(["online", "--device", "cpu", "--dtype", "bfloat16"])
    cfg = load_config(OnlineConfig, "configs/online.yaml", overrides(args))
    assert (cfg.device, cfg.dtype) == ("cpu", "bfloat16")
    with pytest.raises(ConfigError, match="dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"):
        load_config(OnlineConfig, None, {"dtype": "int8"})


def test_bfloat16_head_state_saves_as_float32():
    model = tiny_llama(seed=1).to(torch.bfloat16)
    head = DrafterHead(SplitModel(model, 2), HeadConfig(adapter_hidden=16, lora_rank=4, draft_vocab=64))
    state = head.trainable_state()
    assert state and all(a.dtype.name == "float32" for a in state.values())
    head.load_trainable_state(state)


def test_profile_and_gpu_summary(model_dir, tmp_path, monkeypatch, capsys):
    """`dvi profile` on the static passes (what CUDA graphs replay) and the summary gpu_check.sh prints."""
    import importlib.util
    from pathlib import Path

    monkeypatch.setattr(cli, "COMMANDS", {"bench": "dvi.cli.bench", "profile": "dvi.cli.profile"})
    prompts = write_prompts(tmp_path / "q.jsonl", PROMPTS)
    common = ["--model", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "8", "-k", "2",
              "--passes", "static", "--methods", "hf_ar,dvi_ar,dvi_spec_ngram_dynamic"]
    assert cli.main(["profile", *common, "--out", str(tmp_path / "profile_cpu"), "--trace"]) == 0
    report = json.loads((tmp_path / "profile_cpu" / "profile.json").read_text())
    assert report["passes"] == "static" and [m["name"] for m in report["methods"]] == ["hf_ar", "dvi_ar",
                                                                                       "dvi_spec_ngram_dynamic"]
    for m in report["methods"]:
        assert m["tokens"] == 8 and m["cpu_op_ms_per_token"] > 0 and m["gpu_ms_per_token"] is None
        assert "aten::" in (tmp_path / "profile_cpu" / f"{m['name']}.txt").read_text()
        assert (tmp_path / "profile_cpu" / f"{m['name']}.trace.json").stat().st_size > 0
    assert cli.main(["bench", *common, "--n", "2", "--out", str(tmp_path / "bench_cpu.json")]) == 0
    spec = importlib.util.spec_from_file_location("gpu_summary", Path(__file__).parents[2] / "scripts" / "gpu_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    capsys.readouterr()
    assert summary.main(str(tmp_path)) == 0
    table = capsys.readouterr().out
    assert "| cpu | float32, passes static | dvi_spec_ngram_dynamic |" in table
    assert "| cpu | float32, passes static | dvi_ar |" in table


def test_decode_passes_leave_out_cudnn_attention_on_cuda(monkeypatch):
    """cuDNN attention plans per shape, and an eager decode step's shape is new every step: decode passes
    on CUDA use the other SDPA backends (flags only: no GPU needed to check them)."""
    monkeypatch.delenv("DVI_DECODE_CUDNN_SDPA", raising=False)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # torch's default
    with decode_attention(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled()
    with decode_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    monkeypatch.setenv("DVI_DECODE_CUDNN_SDPA", "1")
    with decode_attention(torch.device("cuda")):
        assert torch.backends.cuda.cudnn_sdp_enabled()
