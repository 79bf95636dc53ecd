"""`dvi generate`: decode one prompt with the self-speculative decoder and show per-round stats."""
from __future__ import annotations

from dvi.cli.args import add_model_args, load_model_parts_from
from selfspec.defaults import POLICIES


def add_parser(sub, name):
    p = sub.add_parser(name, help="generate text for one prompt and show how drafting went", description=__doc__)
    p.add_argument("--prompt", required=True, help="the user message (sent through the chat template)")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    add_model_args(p)
    p.add_argument("--gamma", type=int, default=4, help="drafts per round (cap for adaptive policies); 0 = plain decoding")
    p.add_argument("--length-policy", choices=POLICIES, default="cost_aware", help="draft-length policy (default: cost_aware)")
    p.add_argument("--ngram", type=int, default=1,
                   help="copy drafts from earlier text when the last N+ tokens recur (prompt lookup); 0 = off (default: 1)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from dvi.model_checks import check_decoding_args

    check_decoding_args(args)  # --exit-layer, --head-path, --max-new-tokens against the model, before torch loads
    from selfspec.device import dtype_name
    from selfspec.copy_sources import CopySources
    from selfspec.engine import SelfSpecDecoder
    from selfspec.loading import make_length_policy
    from selfspec.model import quiet_transformers
    from selfspec.prompts import chat_ids

    quiet_transformers()
    if not args.prompt.strip():
        raise ValueError("empty prompt: give --prompt some text")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    parts = load_model_parts_from(args)
    ids = parts.tokenizer(args.prompt)["input_ids"] if args.raw else chat_ids(parts.tokenizer, args.prompt)
    policy = make_length_policy(args.length_policy, args.gamma, parts.passes, parts.head)
    ngram = args.ngram if args.gamma else 0  # gamma 0 is plain decoding: nothing is drafted or copied
    decoder = SelfSpecDecoder(parts.split, parts.head if args.gamma else None, policy, CopySources(ngram),
                              passes=parts.passes)
    result = decoder.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    print(parts.tokenizer.decode(result.tokens, skip_special_tokens=True))
    drafted = sum(r.drafted for r in result.rounds)
    accepted = sum(r.accepted for r in result.rounds)
    print(f"\n[{len(result.tokens)} tokens in {result.t_total:.2f} s = {len(result.tokens) / result.t_total:.1f} tok/s; "
          f"{len(result.rounds)} rounds, mean accepted length {result.mean_accepted_length:.2f}, "
          f"{accepted}/{drafted} drafts accepted; exit layer {parts.split.exit_layer}, {args.length_policy} gamma={args.gamma}, ngram={ngram}; "
          f"{parts.split.device} {dtype_name(parts.split.dtype)}; "
          f"stopped on {result.stop_reason}]")
    return 0
