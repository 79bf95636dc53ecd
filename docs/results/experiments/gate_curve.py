"""The publish gate at work in a run: every candidate head's held-out MAL by learner step, published or held
back, and the best published MAL the gate compared against (learner/metrics.jsonl's charts/candidate_mal and
charts/best_published_mal; versions published before the held-out paths existed from versions.jsonl).

    python docs/results/experiments/gate_curve.py RUN_DIR [RUN_DIR ...] OUT.png
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(run_dirs: list[str], out: str) -> None:
    fig, axes = plt.subplots(len(run_dirs), 1, figsize=(9, 3.2 * len(run_dirs)), squeeze=False, sharex=True)
    for ax, run in zip(axes[:, 0], run_dirs):
        learner = Path(run) / "learner"
        versions = read_jsonl(learner / "versions.jsonl")
        published = {v["step"]: v["heldout_mal"] for v in versions if v.get("heldout_mal") is not None}
        candidates = [(r["step"], r["charts/candidate_mal"]) for r in read_jsonl(learner / "metrics.jsonl")
                      if "charts/candidate_mal" in r]
        held = [(s, m) for s, m in candidates if s not in published]
        ax.plot(list(published), list(published.values()), ".-", lw=0.8, label="published version")
        if held:
            ax.plot(*zip(*held), "x", color="tab:red", label="held back by the gate")
        best, top = [], float("-inf")
        for step, mal in sorted(published.items()):
            top = max(top, mal)
            best.append((step, top))
        ax.step(*zip(*best), where="post", color="grey", lw=0.8, label="best published")
        ax.set_title(Path(run).name, fontsize=10)
        ax.set_ylabel("held-out MAL (γ=4)")
        ax.legend(fontsize=8, loc="lower right")
    axes[-1, 0].set_xlabel("learner step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1:-1], sys.argv[-1])
