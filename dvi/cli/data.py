"""`dvi data fetch|path|list`: the data sets dvi can download (selfspec/datasets.py), into the cache.

    dvi data fetch spec-bench     # Spec-Bench's question.jsonl (480 questions, 0.7 MB) at a pinned commit
    dvi data path spec-bench      # where `--prompts spec-bench` reads it (exit 1 if it is not there)

Files go to $DVI_CACHE_DIR/data (default ~/.cache/dvi/data), checked against a pinned sha256. An environment
variable per data set names a local copy instead and wins over the cache (DVI_SPEC_BENCH for Spec-Bench).
"""
from __future__ import annotations

import argparse
import sys

from selfspec.datasets import DATASETS  # stdlib only: `dvi --help` stays fast


def add_parser(sub, name):
    p = sub.add_parser(name, help="download the data sets dvi uses (Spec-Bench) into the cache",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="data_action", required=True, metavar="ACTION")
    names = sorted(DATASETS)

    fetch = actions.add_parser("fetch", help="download a data set and check its sha256")
    fetch.add_argument("dataset", choices=names, metavar="NAME", help=f"one of: {', '.join(names)}")
    fetch.add_argument("--url", default=None,
                       help="download from here instead of the pinned URL (a mirror, or file:///PATH of a copy); "
                            "the sha256 is checked all the same")
    fetch.add_argument("--force", action="store_true", help="download again even if a good copy is cached")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    fetch.set_defaults(func=run_fetch)

    path = actions.add_parser("path", help="print where a data set's name resolves to (exit 1 if the file is absent)")
    path.add_argument("dataset", choices=names, metavar="NAME", help=f"one of: {', '.join(names)}")
    path.set_defaults(func=run_path)

    listing = actions.add_parser("list", help="the known data sets and where each is")
    listing.set_defaults(func=run_list)


def run_fetch(args) -> int:
    import os

    from selfspec.datasets import cached_path, dataset_path, fetch, get, is_fetched

    ds = get(args.dataset)
    if not args.force and is_fetched(ds.name):
        print(f"{ds.name}: already in {cached_path(ds.name)} (sha256 checked; --force downloads it again)")
    else:
        path = fetch(ds.name, url=args.url, force=args.force, progress=not args.quiet)
        print(f"{ds.name}: {path} (sha256 {ds.sha256[:12]}... checked)")
    if os.environ.get(ds.env):
        print(f"note: {ds.env}={os.environ[ds.env]} is set and takes precedence: `{ds.name}` reads "
              f"{dataset_path(ds.name)}", file=sys.stderr)
    return 0


def run_path(args) -> int:
    from selfspec.datasets import dataset_path, require

    print(dataset_path(args.dataset))
    try:
        require(args.dataset)
    except FileNotFoundError as err:
        print(f"dvi data: {err}", file=sys.stderr)
        return 1
    return 0


def run_list(args) -> int:
    import os

    from selfspec.datasets import dataset_path

    for name, ds in sorted(DATASETS.items()):
        path = dataset_path(name)
        where = f"{path} (from {ds.env})" if os.environ.get(ds.env) else str(path)
        print(f"{name:12s} {'present' if path.is_file() else 'absent ':8s} {where}  [{ds.title}; {ds.url}]")
    return 0
