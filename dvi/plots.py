"""PNG plots for run reports (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_mal_curves(curves: list[tuple[str, list[dict]]], file: Path, gamma: int) -> None:
    """Held-out mean accepted length against training prompts seen, one line per labelled curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves:
        ax.plot([c["prompts"] for c in curve], [c["mal_heldout"] for c in curve], marker="o", label=label)
    ax.set_title("drafter head learning online")
    ax.set_xlabel("training prompts seen")
    ax.set_ylabel(f"mean accepted length, held-out (γ={gamma})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)
