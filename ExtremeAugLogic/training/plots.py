"""PNG plots: training loss and validation Dice against iterations."""

from __future__ import annotations

import math
from pathlib import Path

from ExtremeAugLogic.workspace import atomic


def plot_training(history: list, path: Path, title: str = "training") -> None:
    """Loss (left axis) and validation Dice (right axis) from ``[it, s, loss, lr, dice]`` rows."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [row[0] for row in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(its, [row[2] for row in history], color="tab:blue", label="training loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss", color="tab:blue")
    dice = [(row[0], row[4]) for row in history if row[4] is not None and not math.isnan(row[4])]
    if dice:
        ax2 = ax.twinx()
        ax2.plot(*zip(*dice), "o-", color="tab:green", label="validation Dice")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("validation Dice", color="tab:green")
    ax.set_title(title)
    fig.tight_layout()
    atomic.write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
