"""`dvi learner`: train the drafter head from a run's Redis stream with DeepSpeed and publish versioned weights.

One process by default; with placement.ranks > 1 the ranks run as Ray actors (a local Ray, or the
cluster in RAY_ADDRESS). Stops on SIGTERM (after a checkpoint), at max_steps, or after idle_exit_s
without transitions; `--resume` continues from the latest checkpoint.
"""
from __future__ import annotations

import json

from selfspec.defaults import DEFAULT_MODEL


def add_parser(sub, name):
    p = sub.add_parser(name, help="train the drafter head from the Redis stream (DeepSpeed) and publish weights",
                       description=__doc__)
    p.add_argument("--config", default=None, help="YAML config (see configs/learner.yaml); flags below override it")
    p.add_argument("--redis-url", default=None, help="redis://HOST:PORT of the run's server (redis.url)")
    p.add_argument("--run-id", default=None, help="the run whose stream to read (run_id)")
    p.add_argument("--model", default=None, help=f"a local Hugging Face model directory or `{DEFAULT_MODEL}`")
    p.add_argument("--ranks", type=int, default=None, help="data-parallel ranks (placement.ranks); >1 uses Ray")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--out-dir", default=None, help="metrics.jsonl, tb/, versions.jsonl, checkpoints/")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in checkpoint.dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, dotted for nested ones (YAML value), e.g. --set stream.max_transition_lag=2")
    p.set_defaults(func=run)


def overrides(args) -> dict:
    from dvi.config import cli_overrides

    flags = {"redis.url": args.redis_url, "run_id": args.run_id, "model": args.model, "placement.ranks": args.ranks,
             "max_steps": args.max_steps, "out_dir": args.out_dir}
    return cli_overrides(args.set, flags, "batch_size=128")


def run(args) -> int:
    from dvi.config import load_config
    from dvi.model_checks import check_learner
    from learner.config import LearnerConfig, deepspeed_config

    cfg = load_config(LearnerConfig, args.config, overrides(args))
    check_learner(cfg)  # the exit layer, lengths and vocabulary against the model
    deepspeed_config(cfg.deepspeed, bf16=False)  # a bad DeepSpeed file fails now, not after loading a model
    if cfg.placement.ranks == 1:
        from learner.rank import run_rank

        summaries = [run_rank(cfg, resume=args.resume)]
    else:
        summaries = _run_group(cfg, args.resume)
    for s in summaries:
        s.pop("trained_ids", None)
    print(json.dumps(summaries if len(summaries) > 1 else summaries[0], indent=2))
    return 0


def _run_group(cfg, resume: bool) -> list[dict]:
    import os
    import signal

    import ray

    from learner.launch import LearnerGroup

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    group = LearnerGroup(cfg, resume=resume)
    signal.signal(signal.SIGTERM, lambda *_: group.stop())  # the ranks finish their step and checkpoint
    try:
        return group.run()
    finally:
        group.shutdown()
