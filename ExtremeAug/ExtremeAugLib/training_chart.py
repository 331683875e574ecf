"""The small live training chart: loss (left axis) and validation Dice (right axis) as a PNG.

Drawn off-screen with matplotlib's Agg backend (imported here, only when a chart is drawn)
so it works the same in Slicer, in CI and with ``--no-main-window``; the Widget shows the
file in a QLabel.
"""

from pathlib import Path


def renderChart(history, path, width=360, height=150, dpi=100):
    """Write ``history`` [(iteration, loss, valDice or None), ...] as a PNG; returns the path.

    Returns None when there are fewer than two points (nothing to draw yet).
    """
    points = [(int(i), float(loss), dice) for i, loss, dice in history if loss is not None]
    if len(points) < 2:
        return None
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    lossAxes = figure.add_subplot(1, 1, 1)
    iterations = [p[0] for p in points]
    lossAxes.plot(iterations, [p[1] for p in points], color="#1f77b4", linewidth=1.2)
    lossAxes.set_xlabel("iteration", fontsize=7)
    lossAxes.set_ylabel("loss", fontsize=7, color="#1f77b4")
    lossAxes.tick_params(labelsize=6)
    dicePoints = [(p[0], float(p[2])) for p in points if p[2] is not None]
    if dicePoints:
        diceAxes = lossAxes.twinx()
        diceAxes.plot([p[0] for p in dicePoints], [p[1] for p in dicePoints], "o-", color="#d62728",
                      markersize=2.5, linewidth=1.0)
        diceAxes.set_ylim(0, 1)
        diceAxes.set_ylabel("val Dice", fontsize=7, color="#d62728")
        diceAxes.tick_params(labelsize=6)
    figure.tight_layout(pad=0.4)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(str(path), dpi=dpi)
    return path
