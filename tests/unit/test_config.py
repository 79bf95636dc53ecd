"""Malformed configs name the key and the problem in one line."""
import pytest

from dvi.config import ConfigError, load_config
from selfspec.online import OnlineConfig


def test_shipped_config_loads():
    cfg = load_config(OnlineConfig, "configs/online.yaml")
    assert cfg.exit_layer == 4 and cfg.schedule_config.warmup_steps == 100


def test_overrides_win_and_dotted_keys_reach_nested_configs(tmp_path):
    cfg = load_config(OnlineConfig, "configs/online.yaml", {"gamma": 6, "exit_layer": 8, "lr": None})
    assert cfg.gamma == 6 and cfg.exit_layer == 8 and cfg.lr == 0.001


@pytest.mark.parametrize("text,message", [
    ("gamma: -1\n", r"gamma: Input should be greater than or equal to 1"),
    ("exit_layer: 0\n", r"exit_layer: Input should be greater than or equal to 1"),
    ("schedule_config:\n  warmpu_steps: 5\n", r"schedule_config\.warmpu_steps: Extra inputs are not permitted"),
    ("lr: fast\n", r"lr: Input should be a valid number"),
    ("gamma: [1\n", r"not valid YAML"),
    ("- 1\n- 2\n", r"expected a mapping"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(OnlineConfig, path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file nope.yaml not found"):
        load_config(OnlineConfig, "nope.yaml")


def test_cli_set_reaches_any_key_and_flags_left_unset_do_not_clobber_it():
    from dvi.cli import build_parser
    from dvi.cli.args import online_overrides as overrides

    args = build_parser().parse_args(["online", "--config", "configs/online.yaml", "--set", "train_prompts=50",
                                      "--set", "head.attention_layers=1", "--set", "head.context_window=16",
                                      "--set", "prompt_positions=true", "--gamma", "6"])
    cfg = load_config(OnlineConfig, args.config, overrides(args))
    assert (cfg.train_prompts, cfg.head.attention_layers, cfg.head.context_window, cfg.prompt_positions, cfg.gamma) \
        == (50, 1, 16, True, 6)


def test_cli_set_without_equals_says_what_to_write():
    from dvi.cli import build_parser
    from dvi.cli.args import online_overrides as overrides

    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        overrides(build_parser().parse_args(["online", "--set", "train_prompts"]))


def test_attention_head_without_window_names_the_keys():
    with pytest.raises(ConfigError, match="attention_layers 1 needs context_window >= 1"):
        load_config(OnlineConfig, None, {"head.attention_layers": 1})


def test_extra_training_prompts_come_after_the_workloads_own(tmp_path):
    from selfspec.online import split_prompts
    from selfspec.prompts import Prompt, load_prompts
    from selfspec.synthetic_prompts import write_spec_bench_jsonl

    builtin = load_prompts("builtin")
    extra = [Prompt(f"x{i}", "synthetic-qa", f"question {i}?") for i in range(3)]
    write_spec_bench_jsonl(extra, tmp_path / "extra.jsonl")
    cfg = OnlineConfig(workload="builtin", heldout_prompts=7, train_prompts=len(builtin) - 7 + 2,
                       extra_train_workload=str(tmp_path / "extra.jsonl"))
    own, more, heldout = split_prompts(cfg)
    assert own == builtin[:-7] and more == extra[:2] and heldout == builtin[-7:]
    with pytest.raises(ValueError, match="only 28 prompts besides its 7 held-out ones, plus 3 in"):
        split_prompts(cfg.model_copy(update={"train_prompts": 32}))
    with pytest.raises(ValueError, match="add more with extra_train_workload"):
        split_prompts(cfg.model_copy(update={"train_prompts": 29, "extra_train_workload": None}))


def test_model_side_keys_have_one_owner_and_the_parts_that_differ_say_so():
    from pydantic import ValidationError

    from actors.config import GenerationConfig
    from learner.config import LearnerConfig
    from selfspec.config import DecodingConfig, ModelSideConfig
    from selfspec.path_cache import TOPK_STORED

    assert issubclass(LearnerConfig, ModelSideConfig)
    assert issubclass(OnlineConfig, DecodingConfig) and issubclass(GenerationConfig, DecodingConfig)
    assert GenerationConfig(gamma=0).gamma == 0  # an actor may serve with plain decoding
    for part in (OnlineConfig, LearnerConfig):  # rounds simulated at a fixed draft length
        with pytest.raises(ValidationError, match="greater than or equal to 1"):
            part(gamma=0)
    limit = next(m.le for m in OnlineConfig.model_fields["topk"].metadata if getattr(m, "le", None) is not None)
    assert limit == TOPK_STORED  # dvi online's transitions come from cached paths of this top-K
    GenerationConfig(topk=64)
