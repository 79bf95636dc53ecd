"""`dvi serve`: an OpenAI-compatible endpoint on Ray Serve that learns while it serves. Generation replicas
decode with lossless self-speculation and stream what the verifier decided to Redis; the DeepSpeed learner
of `dvi run` trains the drafter head from it and publishes versions the replicas pull between requests.

    dvi serve --config configs/serve.yaml                  # http://127.0.0.1:8000/v1, embedded Redis, local Ray
    dvi serve --host 0.0.0.0 --port 8080 --api-key KEY     # (or DVI_API_KEY) for clients on other machines
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "stream": true}'

Routes: POST /v1/chat/completions and /v1/completions (stream or not), GET /v1/models, /health, /metrics
(Prometheus). Ctrl-C or SIGTERM drains: in-flight requests finish, the learner checkpoints and publishes,
and the run directory gets summary.json and report.md, as after `dvi run`.
"""
from __future__ import annotations

import argparse


def add_parser(sub, name):
    p = sub.add_parser(name, help="an OpenAI-compatible endpoint (Ray Serve) whose drafter learns from its traffic",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/serve.yaml", help="serve config YAML (default: configs/serve.yaml)")
    p.add_argument("--host", default=None, help="address to bind (serve.host; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (serve.port; default 8000)")
    p.add_argument("--api-key", default=None, help="clients must send it as a Bearer token (serve.api_key; "
                                                   "default: $DVI_API_KEY, else none)")
    p.add_argument("--out-dir", default=None, help="the run directory (out_dir)")
    p.add_argument("--redis-url", default=None, help="redis://HOST:PORT of a running server (redis.url); "
                                                     "default: start one inside the run directory")
    p.add_argument("--replicas", type=int, default=None, help="generation replicas (actors.count)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, dotted for nested ones (YAML value), e.g. --set learn=false")
    p.set_defaults(func=run)


def run(args) -> int:
    from dvi.cli.run import print_summary
    from dvi.config import cli_overrides, load_config
    from dvi.model_checks import check_run
    from dvi.report.run import write_run_report
    from dvi.serve.config import ServeConfig
    from dvi.serve.launch import serve_until_stopped

    flags = {"serve.host": args.host, "serve.port": args.port, "serve.api_key": args.api_key,
             "out_dir": args.out_dir, "redis.url": args.redis_url, "actors.count": args.replicas}
    cfg = load_config(ServeConfig, args.config, cli_overrides(args.set, flags, "serve.port=8080"))
    check_run(cfg)  # the exit layer, lengths, vocabulary and heads against the model, before Ray starts
    run_dir, summary = serve_until_stopped(cfg, overwrite=args.overwrite)
    report = write_run_report(run_dir)
    print_summary(summary, "dvi serve")
    print(f"run directory: {run_dir}" + (f"  report: {report}" if report is not None else ""))
    return 0
