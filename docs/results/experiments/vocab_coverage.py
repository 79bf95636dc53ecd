"""What a run's draft vocabulary leaves outside: the share of the verifier's tokens that are not in it,
on the tokens the run served after its version 0 (requests.jsonl) and on its held-out greedy paths
(the path cache), against the lowest ids of the same size.

    python docs/results/experiments/vocab_coverage.py RUN_DIR    # e.g. runs/spec-bench (configs/spec-bench.yaml)

Run it with the cache directory (DVI_CACHE_DIR) the run used: its paths/ hold the held-out paths (every
*.tokens.npz there is taken, so use a cache only that run filled).
"""
import json
import sys
from pathlib import Path

import numpy as np
import yaml
from safetensors.numpy import load_file

from selfspec.cache import cache_dir
from selfspec.drafter import draft_vocab_ids
from selfspec.model_facts import model_facts


def outside(tokens: np.ndarray, vocab: np.ndarray) -> float:
    return float(np.mean(~np.isin(tokens, vocab)))


def main(run: Path) -> dict:
    config = yaml.safe_load((run / "config.yaml").read_text())
    served = load_file(str(run / "learner" / "heads" / "v0000" / "head.safetensors"))["vocab_ids"]
    lowest = draft_vocab_ids(model_facts(config["model"]).vocab_size, len(served))  # EOS ids are low anyway
    summary = json.loads((run / "summary.json").read_text())
    v0 = json.loads((run / "learner" / "versions.jsonl").read_text().splitlines()[0])["published_at"]
    replay_start = summary["started_at"] + summary["actors_ready_s"]
    requests = [json.loads(line) for line in (run / "requests.jsonl").read_text().splitlines()]
    later = [r for r in requests if r["ok"] and r["sent_s"] > v0 - replay_start]
    after = np.concatenate([r["extra"]["output_ids"] for r in later])
    heldout = []
    for file in sorted((cache_dir() / "paths").glob("*.tokens.npz")):
        with np.load(file) as path:
            heldout.append(path["tokens"][int(path["prompt_len"]):])
    heldout = np.concatenate(heldout)
    return {"vocab": len(served), "ids_beyond_lowest": int((~np.isin(served, lowest)).sum()),
            "served_after_v0": {"requests": len(later), "tokens": len(after),
                                "outside_served_vocab": outside(after, served), "outside_lowest": outside(after, lowest)},
            "heldout_paths": {"tokens": len(heldout), "outside_served_vocab": outside(heldout, served),
                              "outside_lowest": outside(heldout, lowest)}}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
