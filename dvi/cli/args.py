"""Arguments shared by several commands: the decoding commands' model and device flags, and the flags of
`dvi online` that `dvi ablate` takes too."""
from __future__ import annotations

from selfspec.defaults import DEFAULT_MODEL

# selfspec.device.DTYPE_CHOICES and selfspec.passes.PASS_MODES, repeated here: building the parser
# (`dvi --help`) must not import torch.
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
PASS_MODES = ("auto", "eager", "static", "graphs")


def add_model_args(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a local Hugging Face model directory or `{DEFAULT_MODEL}` (default)")
    p.add_argument("--exit-layer", "-k", type=int, default=4, help="draft from layer k's hidden state (default: 4)")
    p.add_argument("--head-path", default=None,
                   help="a trained drafter head directory (from `dvi online`); its exit layer wins")
    add_device_args(p)
    p.add_argument("--passes", default="auto", choices=PASS_MODES,
                   help="how decode passes run: graphs = CUDA graphs over a static KV cache, static = the same "
                        "passes eagerly, eager = per-layer cache lengths (default: auto = graphs on CUDA, else eager)")


def load_model_parts_from(args, head_path: str | None = None):
    """selfspec.loading.load_model_parts with the arguments add_model_args added (`head_path` overrides --head-path)."""
    from selfspec.loading import DeviceSettings, load_model_parts

    return load_model_parts(args.model, args.exit_layer, head_path or args.head_path,
                        settings=DeviceSettings(args.device, args.dtype, args.passes))


def add_device_args(p, dtype_default: str | None = "auto") -> None:
    """`--device` and `--dtype` (resolved by selfspec.device); a command whose config has a dtype key
    passes dtype_default=None so that the flag left unset does not override it."""
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu)")
    p.add_argument("--dtype", default=dtype_default, choices=DTYPE_CHOICES,
                   help="model precision (default: auto = float32 on CPU and on CUDA: bfloat16 measured "
                        "2-5x slower at batch 1 on an H200 and departed from hf_ar's greedy output)")



def add_online_args(p) -> None:
    """The flags of `dvi online` and `dvi ablate`: a config file and the keys they may override."""
    p.add_argument("--config", default=None, help="YAML config (see configs/online.yaml); flags below override it")
    p.add_argument("--model", default=None)
    p.add_argument("--workload", default=None, help="builtin, humaneval, spec-bench, or a Spec-Bench-format JSONL path")
    p.add_argument("--train-prompts", type=int, default=None)
    p.add_argument("--heldout-prompts", type=int, default=None, help="from the end of the workload, never trained on")
    p.add_argument("--exit-layer", "-k", type=int, default=None)
    p.add_argument("--gamma", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    add_device_args(p, dtype_default=None)  # None: the config's dtype stands
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, dotted for nested ones (YAML value), e.g. "
                        "--set head.attention_layers=1 --set head.context_window=16; repeatable")


def online_overrides(args) -> dict:
    """add_online_args' flags (and --set) as config overrides of selfspec.config.OnlineConfig."""
    from dvi.config import cli_overrides

    flags = {"model": args.model, "workload": args.workload, "train_prompts": args.train_prompts,
             "heldout_prompts": args.heldout_prompts, "exit_layer": args.exit_layer, "gamma": args.gamma,
             "lr": args.lr, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
             "device": args.device, "dtype": args.dtype}
    return cli_overrides(args.set, flags, "head.draft_vocab=8192")
