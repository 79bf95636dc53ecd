"""`dvi synth-prompts`: more training prompts, written by the model from seed prompts (few-shot).

Seeds are the first --seed-prompts of the workload: keep them disjoint from the held-out prompts
(`dvi online` holds out the workload's last --heldout-prompts). The output is Spec-Bench JSONL,
for `dvi online --set extra_train_workload=FILE`.
"""
from __future__ import annotations

from selfspec.defaults import DEFAULT_MODEL


def add_parser(sub, name):
    p = sub.add_parser(name, help="write more training prompts with the model itself (few-shot from seeds)",
                       description=__doc__)
    p.add_argument("--workload", required=True, help="seed prompts: builtin, humaneval, spec-bench or a Spec-Bench JSONL path")
    p.add_argument("--seed-prompts", type=int, required=True,
                   help="use the workload's first N prompts as seeds (never its held-out tail)")
    p.add_argument("--n", type=int, required=True, help="how many prompts to write")
    p.add_argument("--out", required=True, help="output JSONL (Spec-Bench format)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=80, help="length cap of one written prompt, in tokens")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from selfspec.model import load_model, quiet_transformers
    from selfspec.prompts import load_prompts
    from selfspec.synthetic_prompts import SynthOptions, synthesize_prompts, write_spec_bench_jsonl

    if args.n < 1 or args.seed_prompts < 1:
        raise ValueError("--n and --seed-prompts must be at least 1")
    quiet_transformers()
    seeds = load_prompts(args.workload, args.seed_prompts)
    model, tokenizer = load_model(args.model)
    options = SynthOptions(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, seed=args.seed)
    prompts = synthesize_prompts(model, tokenizer, seeds, args.n, options)
    write_spec_bench_jsonl(prompts, args.out)
    print(f"{len(prompts)} prompts from {len(seeds)} seeds written to {args.out}")
    return 0
