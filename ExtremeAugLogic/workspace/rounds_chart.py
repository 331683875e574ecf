"""``rounds.png``: the loop round by round, Dice above and correction effort below.

One point per accepted correction (``contract.round_rows``): the test-then-train Dice of the
prediction the clinician corrected (per structure and binary), and what the correction
changed (voxels, slices touched). Rounds the best model has not trained on yet are drawn
hollow. Derived from the manifest like ``dataset.json`` and written atomically; matplotlib
is imported only when a chart is drawn, so opening a workspace (and ``status``) stays fast.
"""

from __future__ import annotations

from pathlib import Path

from ExtremeAugLogic.workspace import atomic


def write_rounds_chart(rows: list, path: Path, title: str = "the loop, round by round") -> bool:
    """Draw ``rows`` into the PNG at ``path`` (atomically); False, writing nothing, when there is no round."""
    if not rows:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rounds = [row["round"] for row in rows]
    figure = Figure(figsize=(6, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    dice_axes, effort_axes = figure.subplots(2, 1, sharex=True)
    for key, label, colour in (("mean_dice", "per-structure Dice", "tab:green"), ("binary_dice", "binary Dice", "tab:blue")):
        points = [(row["round"], row[key], row["in_best"]) for row in rows if row[key] is not None]
        dice_axes.plot([p[0] for p in points], [p[1] for p in points], "-", color=colour, label=label)
        for filled in (True, False):
            chosen = [p for p in points if p[2] == filled]
            dice_axes.plot([p[0] for p in chosen], [p[1] for p in chosen], "o", color=colour,
                           markerfacecolor=colour if filled else "white", linestyle="none")
    dice_axes.set_ylim(0, 1)
    dice_axes.set_ylabel("Dice of the prediction\nagainst its correction", fontsize=8)
    dice_axes.legend(fontsize=7, loc="lower right")
    dice_axes.set_title(title, fontsize=9)
    voxels = [row["changed_voxels"] or 0 for row in rows]
    effort_axes.bar(rounds, voxels, color=["tab:orange" if row["in_best"] else "white" for row in rows],
                    edgecolor="tab:orange")
    effort_axes.set_ylabel("voxels changed", fontsize=8, color="tab:orange")
    slices_axes = effort_axes.twinx()
    slices_axes.plot(rounds, [row["slices_touched"] or 0 for row in rows], "s-", color="tab:purple", markersize=3)
    slices_axes.set_ylabel("slices touched", fontsize=8, color="tab:purple")
    slices_axes.set_ylim(bottom=0)
    slices_axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    effort_axes.set_xlabel("round (accepted correction; hollow: not in the best model yet)", fontsize=8)
    effort_axes.set_xticks(rounds)
    effort_axes.set_xticklabels([f"{row['round']}\n{row['id']}" for row in rows], fontsize=6)
    for axes in (dice_axes, effort_axes, slices_axes):
        axes.tick_params(labelsize=7)
    figure.tight_layout()
    atomic.write_with(path, lambda tmp: figure.savefig(tmp, format="png"))
    return True
