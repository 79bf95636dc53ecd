"""`dvi bench-learner`: learner throughput (one rank and several), publish latency, and how many
generation processes one learner rank keeps up with.

The learner runs exactly as `dvi learner` does (DeepSpeed, the config's head, a fresh local
redis-server) on a stream filled beforehand with random transitions shaped like real ones (the
config's hidden size, `--positions` verified positions per round, top-16), so it never waits for
data: what is measured is how fast it consumes. The generation rate is one SmolLM2 decoding process
(`dvi generate`'s defaults: cost-aware γ<=4, copied n-gram drafts, the untrained head; one thread,
as a generation actor with num_cpus=1) emitting a transition per round into a counting sink.
"""
from __future__ import annotations

from dvi.report.format import write_report


def add_parser(sub, name):
    p = sub.add_parser(name, help="benchmark the DeepSpeed learner (1 and 2 ranks) against the generation rate",
                       description=__doc__)
    p.add_argument("--config", default="configs/learner.yaml", help="learner config whose head and batch to measure")
    p.add_argument("--layouts", default="1x1,1x2,2x1",
                   help="RANKSxTHREADS per rank to measure, comma-separated (more than 1 rank uses a local Ray)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the rates")
    p.add_argument("--positions", type=int, default=4, help="verified positions per transition (γ=4: up to 5)")
    p.add_argument("--generation-prompts", type=int, default=4, help="builtin prompts decoded for the generation "
                                                                     "rate (0: skip)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--generation-threads", type=int, default=1,
                   help="torch threads of the generation process (1: a generation actor with num_cpus=1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a learner config key")
    p.add_argument("--out", default="runs/bench_learner.json", help="JSON report")
    p.set_defaults(func=run)


def run(args) -> int:
    from dvi.config import cli_overrides
    from dvi.studies.learner_bench import LearnerBenchSpec, run_learner_bench

    layouts = [tuple(int(x) for x in item.split("x")) for item in args.layouts.split(",") if item.strip()]
    if args.steps <= args.warmup:
        raise ValueError(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    spec = LearnerBenchSpec(args.config, layouts, args.steps, args.warmup, args.positions, args.generation_prompts,
                            args.max_new_tokens, args.generation_threads,
                            cli_overrides(args.set, {}, "batch_size=128"))
    report = run_learner_bench(spec)
    print_table(report)
    write_report(report, args.out)
    return 0


def print_table(report: dict) -> None:
    print(f"learner on {report['cpus']} CPUs, {report['model']} head {report['head']}, batch {report['batch_size']} "
          f"transitions x {report['positions_per_transition']} positions, {report['deepspeed']}")
    print(f"{'ranks x threads':<16}{'steps/s':>9}{'trans/s':>9}{'pos/s':>9}{'train':>7}{'publish ms':>12}{'blob MB':>9}"
          f"{'commit s':>10}{'gen procs':>10}")
    for name, r in report["learner"].items():
        print(f"{name:<16}{r['steps_per_s']:>9}{r['transitions_per_s']:>9}{r['positions_per_s']:>9}"
              f"{r['train_share']:>7}{r['publish_ms_median']:>12}{r['blob_mb']:>9}{r['commit_s']:>10}"
              f"{r.get('generation_processes_kept_up_with', '-'):>10}")
    if "generation" in report:
        g = report["generation"]
        print(f"one generation process: {g['tokens_per_s']} tokens/s, {g['transitions_per_s']} transitions/s, "
              f"{g['positions_per_s']} positions/s ({g['positions_per_transition']} per transition; {g['policy']})")
