"""Values that depend on the model, checked against the model's own config file before Ray, a model or any
process starts: the exit layer, lengths against the context, the draft vocabulary, a saved head's shape and
exit layer. Each command calls its check right after load_config; each failure is one line naming the key
(or flag) and both numbers, e.g.

    exit_layer = 99: the model smollm2-135m has 30 layers (exit_layer must be 1..29)

Nothing here imports torch: the facts come from json and file headers (selfspec.model_facts).
"""
from __future__ import annotations

from pathlib import Path

from selfspec.config import HeadConfig
from selfspec.model_facts import HeadFacts, ModelFacts, head_facts, model_facts


class ModelCheckError(ValueError):
    """A value the model cannot take; one line naming the key."""


def _given(key: str, value) -> str:
    """How a message names what the user gave: `exit_layer = 99` (a config key), `--exit-layer 99` (a flag)."""
    return f"{key} {value}" if key.startswith("--") else f"{key} = {value}"


def check_exit_layer(facts: ModelFacts, exit_layer: int, key: str = "exit_layer") -> None:
    top = facts.num_layers - 1
    if not 1 <= exit_layer <= top:
        raise ModelCheckError(f"{_given(key, exit_layer)}: the model {facts.name} has {facts.num_layers} layers "
                              f"({key} must be 1..{top})")


def check_head_config(facts: ModelFacts, head: HeadConfig, exit_layer: int, key: str = "head",
                      exit_key: str = "exit_layer") -> None:
    if head.draft_vocab is not None and head.draft_vocab > facts.vocab_size:
        raise ModelCheckError(f"{key}.draft_vocab = {head.draft_vocab}: the model {facts.name} has a vocabulary of "
                              f"{facts.vocab_size} ids ({key}.draft_vocab must be at most {facts.vocab_size}, or "
                              "null for all of them)")
    left = facts.num_layers - exit_layer
    if head.attention_layers > left:
        raise ModelCheckError(f"{key}.attention_layers = {head.attention_layers}: the model {facts.name} has "
                              f"{facts.num_layers} layers, {left} from {exit_key} = {exit_layer} on "
                              f"({key}.attention_layers must be at most {left})")


def check_length(facts: ModelFacts, max_new_tokens: int, key: str, gamma: int | None = None,
                 gamma_key: str = "gamma") -> None:
    """max_new_tokens, plus gamma + 1 positions a decoding round drafts and verifies beyond it (when `gamma` is
    given: decoding; None: a greedy path), must leave the prompt at least one of the model's positions."""
    if facts.max_positions is None:
        return
    headroom = 0 if gamma is None else gamma + 1
    most = facts.max_positions - 1 - headroom
    if max_new_tokens > most:
        drafts = "" if gamma is None else f" and {_given(gamma_key, gamma)} needs {headroom} more"
        raise ModelCheckError(f"{_given(key, max_new_tokens)}: the model {facts.name} has {facts.max_positions} positions"
                              f"{drafts} ({key} must be at most {most}, less the prompt's length)")


def check_saved_head(facts: ModelFacts, path: str | Path, key: str, exit_layer: int | None = None,
                     exit_key: str = "exit_layer") -> HeadFacts:
    """A head saved by selfspec.drafter.save_head must fit the model; with `exit_layer`, also sit at that layer
    (the learner trains at it). Returns the head's facts."""
    try:
        head = head_facts(path)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"{key}: {err}") from None
    where = _given(key, path)
    if head.hidden_size is not None and head.hidden_size != facts.hidden_size:
        raise ModelCheckError(f"{where}: the head was saved for hidden size {head.hidden_size}, the model "
                              f"{facts.name} has hidden size {facts.hidden_size} (a head of another model?)")
    if head.max_vocab_id is not None and head.max_vocab_id >= facts.vocab_size:
        raise ModelCheckError(f"{where}: the head's draft vocabulary holds id {head.max_vocab_id}, the model "
                              f"{facts.name} has {facts.vocab_size} ids (a head of another model?)")
    if head.max_vocab_id is None and head.output_rows is not None and head.output_rows != facts.vocab_size:
        raise ModelCheckError(f"{where}: the head drafts over {head.output_rows} ids, the model {facts.name} has "
                              f"a vocabulary of {facts.vocab_size} (a head of another model?)")
    top = facts.num_layers - 1
    if not 1 <= head.exit_layer <= top:
        raise ModelCheckError(f"{where}: the head was saved at exit layer {head.exit_layer}, the model {facts.name} "
                              f"has {facts.num_layers} layers (exit layers 1..{top})")
    attention = int(head.head.get("attention_layers") or 0)
    if head.exit_layer + attention > facts.num_layers:
        raise ModelCheckError(f"{where}: the head's {attention} attention layers from exit layer {head.exit_layer} "
                              f"need {head.exit_layer + attention} layers, the model {facts.name} has "
                              f"{facts.num_layers}")
    if exit_layer is not None and head.exit_layer != exit_layer:
        raise ModelCheckError(f"{where}: the head was saved at exit layer {head.exit_layer}, but "
                              f"{_given(exit_key, exit_layer)} (the learner trains at {exit_key}: set it to {head.exit_layer}, or "
                              "start from another head)")
    return head


def check_run(cfg, facts: ModelFacts | None = None, heads: bool = True) -> ModelFacts:
    """A `dvi run` or `dvi serve` config (dvi.run.config.SystemConfig; a run's trace too). `heads`: also check
    actors.head_path (a drift study sets it to a head it has yet to train)."""
    facts = facts or model_facts(cfg.model)
    check_exit_layer(facts, cfg.exit_layer)
    check_head_config(facts, cfg.head, cfg.exit_layer)
    if heads and cfg.actors.head_path is not None:
        # serving only, the head's own exit layer wins; learning, the learner's versions replace it at exit_layer
        check_saved_head(facts, cfg.actors.head_path, "actors.head_path", cfg.exit_layer if cfg.learn else None)
    trace = getattr(cfg, "trace", None)  # `dvi serve` has none: its requests are checked as they come
    if trace is not None and trace.make is not None:
        check_length(facts, cfg.trace.make.max_new_tokens, "trace.make.max_new_tokens", cfg.actors.gamma,
                     "actors.gamma")
    if cfg.learn:
        check_heldout(facts, cfg.learner, "learner.")
    return facts


def check_heldout(facts: ModelFacts, cfg, prefix: str = "") -> None:
    """A learner config's held-out greedy paths (learner.config.LearnerConfig.heldout)."""
    from learner.heldout import heldout_prompts

    if cfg.heldout.prompts:
        check_length(facts, cfg.heldout.max_new_tokens, f"{prefix}heldout.max_new_tokens")
        heldout_prompts(cfg.heldout, f"{prefix}heldout")  # the learner's own check, before anything starts


def check_learner(cfg) -> ModelFacts:
    """A `dvi learner` config (learner.config.LearnerConfig)."""
    facts = model_facts(cfg.model)
    check_exit_layer(facts, cfg.exit_layer)
    check_head_config(facts, cfg.head, cfg.exit_layer)
    check_heldout(facts, cfg)
    return facts


def check_online(cfg) -> ModelFacts:
    """A `dvi online` config (selfspec.config.OnlineConfig): its greedy paths are max_new_tokens long."""
    facts = model_facts(cfg.model)
    check_exit_layer(facts, cfg.exit_layer)
    check_head_config(facts, cfg.head, cfg.exit_layer)
    check_length(facts, cfg.max_new_tokens, "max_new_tokens")
    return facts


def check_drift(cfg) -> ModelFacts:
    """A `dvi drift` study (dvi.studies.drift_config.DriftConfig): every arm's run config, and the offline head's
    paths."""
    from dvi.studies.drift_config import arm_config

    facts = model_facts(cfg.model)
    for arm in cfg.arms:
        check_run(arm_config(cfg, arm), facts, heads=False)
    if cfg.trace.make is not None:  # its own check names the study's key, not the arm's trace file
        check_length(facts, cfg.trace.make.max_new_tokens, "trace.make.max_new_tokens", cfg.actors.gamma,
                     "actors.gamma")
    if cfg.offline.max_new_tokens is not None and "frozen_offline" in cfg.arms:
        check_length(facts, cfg.offline.max_new_tokens, "offline.max_new_tokens")
    return facts


def check_decoding_args(args, head_path: str | None = None) -> ModelFacts:
    """The flags of a decoding command (dvi generate, bench, eval, profile): --model, --exit-layer (unless a
    saved head is given: its own exit layer wins), --head-path (or `head_path`), --max-new-tokens and --gamma."""
    facts = model_facts(args.model)
    head_path = head_path or getattr(args, "head_path", None)
    if head_path is not None:
        check_saved_head(facts, head_path, "--head-path")
    else:
        check_exit_layer(facts, args.exit_layer, "--exit-layer")
    if getattr(args, "max_new_tokens", None) is not None:
        check_length(facts, args.max_new_tokens, "--max-new-tokens", max(getattr(args, "gamma", 0) or 0, 0), "--gamma")
    return facts
