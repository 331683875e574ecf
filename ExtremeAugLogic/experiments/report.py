"""``report.md`` and the figures of an ``experiment`` run, from its ``results.json``.

Table I: training Dice at the end (the cell's own training scans); Table II: mean validation
Dice; the paper's values where ``/work/shared/docs/anchors.md`` states them ("-" elsewhere);
Figure 6 (validation Dice against augmentation level, one line per training-set size) and
Figure 7 (against training-set size, one line per level), baselines dashed; patch statistics.
Rewritten after every cell, so a running grid always has an up-to-date report.
"""

from __future__ import annotations

import math
from pathlib import Path

from ExtremeAugLogic.workspace import atomic

REPORT_NAME = "report.md"
# Mean validation Dice stated in the extreme-augmentation paper (Table II) as quoted in
# /work/shared/docs/anchors.md; every other cell of the paper's tables is not quoted there.
PAPER_TABLE2 = {(1, 5): 0.641, (1, 50): 0.729, (9, 50): 0.863}

FIGURE6 = "figure6_dice_vs_level.png"
FIGURE7 = "figure7_dice_vs_scans.png"
BASELINE_TEXT = {
    "none": "no augmentation (rotation 0, scale 1, no translation, no intensity jitter, level 1)",
    "crops": "random crops only, as MONAI Label's default trainer (no affine; the crop centre moved by a "
             "fresh uniform shift of up to half a patch per sample, no intensity jitter, level 0)",
}
KIND_TEXT = {
    "random_crops": "random crops (centres uniform in the slice, crop inside it)",
    "foreground": "foreground-aware base patches (sampling=foreground)",
    "grid": "the paper's grid (sampling=grid, stride {stride})",
    "crops_baseline": "crops baseline as trained (base patch centres + a shift of up to half a patch)",
}


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _columns(results: dict) -> list[tuple[str, object]]:
    exp = results["experiment"]
    return [(f"{n}x", n) for n in exp["levels"]] + [(b, b) for b in exp["baselines"]]


def _key(s: int, column) -> str:
    return f"s{s}_L{column}" if isinstance(column, int) else f"s{s}_{column}"


def _table(results: dict, pick, paper: dict | None = None) -> list[str]:
    columns = _columns(results)
    lines = ["| training scans | " + " | ".join(name for name, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for s in results["experiment"]["subjects"]:
        row = []
        for _, column in columns:
            cell = results["cells"].get(_key(s, column))
            text = _fmt(pick(cell)) if cell else "-"
            if paper is not None and isinstance(column, int) and (s, column) in paper:
                text += f" (paper {paper[(s, column)]:.3f})"
            row.append(text)
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    return lines


def _paper_table(results: dict, paper: dict) -> list[str]:
    exp = results["experiment"]
    levels = sorted(set(exp["levels"]) | {n for _, n in paper})
    subjects = sorted(set(exp["subjects"]) | {s for s, _ in paper})
    lines = ["| training scans | " + " | ".join(f"{n}x" for n in levels) + " |", "|---|" + "---|" * len(levels)]
    for s in subjects:
        lines.append(f"| {s} | " + " | ".join(_fmt(paper.get((s, n))) for n in levels) + " |")
    return lines


def _val(cell, what="binary"):
    return None if not cell or not cell.get("val_dice") else cell["val_dice"].get(what)


def _train(cell, what="binary"):
    return None if not cell or not cell.get("train_dice") else cell["train_dice"].get(what)


def write_report(out, results: dict) -> Path:
    """Write ``report.md`` and the two figures into ``out``; returns the report's path."""
    out = Path(out)
    exp = results["experiment"]
    ident = exp["identity"]
    cells = results["cells"]
    figures = plot_figures(out, results)
    if ident.get("iterations_per_cell") is not None:
        budget = f"{ident['iterations_per_cell']} iterations"
    else:
        budget = f"{ident.get('minutes_per_cell'):g} minutes"
    defaults = exp.get("defaults", {})
    done, planned = len(cells), len(results.get("planned", []))
    missing = [k for k in results.get("planned", []) if k not in cells]
    lines = [
        f"# Extreme augmentation grid: {Path(ident['data']).name}",
        "",
        f"- machine: {results.get('machine', '?')}",
        f"- command: `{exp.get('command') or '?'}`" + (
            "" if len(results.get("commands", [])) <= 1 else
            f" (continued; earlier: {'; '.join('`' + c + '`' for c in results['commands'][:-1])})"),
        f"- run: started {results.get('started_at', '?')}, updated {results.get('updated_at', '?')}; "
        f"{done} of {planned} planned cells done" + ("" if not missing else f" (to do: {', '.join(missing)})"),
        f"- training scans (the first s of): {', '.join(ident['train'])}; validation scans: {', '.join(ident['validate'])}",
        f"- device: {exp.get('device')}" + (f" ({exp['device_used']})" if exp.get("device_used") not in (None, exp.get("device")) else "") + f"; seed {ident.get('seed')}; recipe 2d (preset {defaults.get('preset', 'default')}), "
        f"slices {defaults.get('inplane_size')} px, patch {defaults.get('patch_size')}, "
        f"batch {defaults.get('batch_size')}, sampling {defaults.get('sampling')}, slice axis {defaults.get('slice_axis')}, "
        f"augmentation ranges rotation +/-{defaults.get('rotation_deg')} deg, scale {defaults.get('scale')}, "
        f"translation +/-{defaults.get('translation_px')} px"
        + ("" if not ident.get("settings") else f"; --set {ident['settings']}"),
        "",
        "## Compute rule",
        "",
    ]
    if ident.get("compute") == "epochs":
        lines.append(f"**The paper's rule (`--compute epochs`)**: the budget ({budget} at the smallest level) is "
                     "multiplied by N / min(levels), so a 50x cell trains 10x longer than a 5x cell, as 100 epochs of "
                     "an N-fold dataset did in the paper; baselines get the unscaled budget. Augmentation and training "
                     "length are confounded in this mode.")
    else:
        lines.append(f"**Equal budget per cell: {budget} for every cell** (levels and baselines alike). A level N "
                     "therefore sets how many *distinct* augmented samples the model draws its batches from (base "
                     "patches x N), not how much it computes. The paper trained every cell for 100 epochs of its "
                     "N-fold dataset, so its 50x cells had 10x the updates of its 5x cells: its Table II mixes the "
                     "effect of augmentation with that of training 10x longer. (`--compute epochs` reproduces that "
                     "rule.)")
    lines += ["", "Baselines (same budget): " + "; ".join(f"**{b}** = {BASELINE_TEXT[b]}" for b in exp["baselines"])
              + "." if exp["baselines"] else "", ""]
    lines += ["Dice: *binary* = all structures merged into one foreground (closest to the paper's single-class "
              "Dice); *per-structure* = the mean over the structures present in the reference. Predictions are the "
              "engine's (sliding windows, Gaussian blending, specks below 10% of a structure's largest component "
              "removed).", ""]
    lines += ["## Table I: training Dice at the end (binary, on the cell's training scans)", ""]
    lines += _table(results, _train)
    lines += ["", "Per-structure mean:", ""] + _table(results, lambda c: _train(c, "mean"))
    lines += ["", "## Table II: mean validation Dice (binary)", ""]
    lines += _table(results, _val, PAPER_TABLE2)
    lines += ["", "Per-structure mean:", ""] + _table(results, lambda c: _val(c, "mean"))
    lines += ["", "Paper, Table II (mean validation Dice on 40 scans; only the values quoted in the project's "
              "anchors are shown, \"-\" = not quoted):", ""] + _paper_table(results, PAPER_TABLE2)
    lines += ["", "Our value beside the paper's, where the paper's is quoted:", "",
              "| cell | ours (binary) | ours (per-structure) | paper |", "|---|---|---|---|"]
    for (s, n), value in sorted(PAPER_TABLE2.items()):
        cell = cells.get(_key(s, n))
        lines.append(f"| {s} scan(s), {n}x | {_fmt(_val(cell))} | {_fmt(_val(cell, 'mean'))} | {value:.3f} |")
    lines += [""]
    for name, title in figures:
        lines += [f"![{title}]({name})", ""]
    lines += ["## Cells", "",
              "| cell | scans | level | iterations | training s | samples drawn | distinct samples | peak memory MiB "
              "| val Dice binary | val Dice per-structure | train Dice binary |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in results.get("planned", []):
        cell = cells.get(key)
        if not cell:
            continue
        distinct = cell.get("distinct_samples")
        if cell.get("baseline") == "crops":
            distinct_text = "unlimited"
        else:
            distinct_text = "-" if distinct is None else str(distinct)
        peak = cell.get("peak_rss_mib")
        lines.append(f"| {key} | {cell['subjects']} | {cell['level'] if cell['baseline'] is None else cell['baseline']} "
                     f"| {cell['iterations']} | {cell['train_seconds']:.0f} | {cell.get('samples_drawn', '-')} "
                     f"| {distinct_text} | {'-' if peak is None else f'{peak:.0f}'} | {_fmt(_val(cell))} "
                     f"| {_fmt(_val(cell, 'mean'))} | {_fmt(_train(cell))} |")
    lines += ["", "Samples drawn = iterations x batch size; distinct samples = base patches x level (what a level "
              "bounds). Peak memory is the training process's peak resident set size.", ""]
    lines += _patch_section(results.get("patch_statistics"))
    report = "\n".join(lines) + "\n"
    path = out / REPORT_NAME
    atomic.write_text(path, report)
    return path


def _patch_section(stats: dict | None) -> list[str]:
    if not stats or not stats.get("geometries"):
        return []
    lines = ["## Patch statistics: training patches that cut a structure at their edge", "",
             f"On the preprocessed training slices of {', '.join(stats['cases'])}. A patch *cuts* a structure when it "
             "holds part of a connected structure (per slice and label) but not all of it; the network then learns "
             "an edge where the anatomy has none, a form of label noise. Random crops: centres uniform over the "
             "positions that keep the crop inside the slice, as many as the grid has.", ""]
    for geometry in stats["geometries"]:
        lines += [f"With {geometry['name']}: {geometry['slices']} slices of {geometry['slice_size']} px, patches "
                  f"{geometry['patch_size']} px, stride {geometry['stride']}.", "",
                  "| patches | count | with foreground | cut a structure (of those with foreground) "
                  "| foreground pixels in cut structures |", "|---|---|---|---|---|"]
        for kind, s in geometry["kinds"].items():
            text = KIND_TEXT.get(kind, kind).format(stride=geometry.get("stride"))
            if kind == geometry.get("sampling") and geometry is stats["geometries"][0]:
                text += " **(the cells' base patches)**"
            lines.append(f"| {text} | {s['patches']} | {s['with_foreground']} ({100 * s['foreground_fraction']:.0f}%) "
                         f"| {100 * s['cut_fraction']:.1f}% | {100 * s['cut_pixel_fraction']:.1f}% |")
        lines.append("")
    if stats["geometries"][0]["patch_size"] >= stats["geometries"][0]["slice_size"]:
        lines += ["With the cells' settings a patch is the whole slice, so a crop has no position to choose and "
                  "cuts nothing; the crops baseline then only shifts the slice (by up to half its size, padding "
                  "the rest).", ""]
    paper = stats["geometries"][-1]
    rc = paper["kinds"].get("random_crops")
    if rc:
        lines += ["Published claim: random crops add about a quarter label noise. Measured here "
                  f"({paper['name']}): random crops cut a structure in {100 * rc['cut_fraction']:.1f}% of the crops "
                  f"that hold foreground, and {100 * rc['cut_pixel_fraction']:.1f}% of the foreground pixels they "
                  f"show belong to a cut structure; the grid cuts {100 * paper['kinds']['grid']['cut_fraction']:.1f}%, "
                  f"foreground-aware patches {100 * paper['kinds']['foreground']['cut_fraction']:.1f}%.", ""]
    return lines


def plot_figures(out, results: dict) -> list[tuple[str, str]]:
    """Figures 6 and 7 as PNGs in ``out``; [(file name, title)] of those written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    out = Path(out)
    exp, cells = results["experiment"], results["cells"]
    subjects, levels, baselines = exp["subjects"], exp["levels"], exp["baselines"]
    styles = {"none": ("--", "x"), "crops": (":", "s")}
    written = []
    if not cells:
        return written

    # Figure 6: Dice against level, a line per training-set size.
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    colours = plt.cm.viridis([i / max(len(subjects) - 1, 1) * 0.9 for i in range(len(subjects))])
    handles = []
    for colour, s in zip(colours, subjects):
        xs = [n for n in levels if _val(cells.get(_key(s, n))) is not None]
        if xs:
            ax.plot(xs, [_val(cells[_key(s, n)]) for n in xs], "o-", color=colour)
        handles.append(Line2D([], [], color=colour, marker="o", label=f"{s} scan{'s' if s > 1 else ''}"))
        for b in baselines:
            value = _val(cells.get(_key(s, b)))
            if value is not None:
                ax.axhline(value, color=colour, linestyle=styles[b][0], linewidth=1.2)
    for b in baselines:
        handles.append(Line2D([], [], color="grey", linestyle=styles[b][0], label=f"baseline: {b}"))
    paper = [(n, v) for (s, n), v in PAPER_TABLE2.items()]
    if paper:
        for (s, n), v in PAPER_TABLE2.items():
            ax.plot([n], [v], "*", color="black", markersize=11)
            ax.annotate(f"paper, {s} scan{'s' if s > 1 else ''}", (n, v), textcoords="offset points",
                        xytext=(5, -12), fontsize=7)
        handles.append(Line2D([], [], color="black", marker="*", linestyle="", markersize=10, label="paper (Table II)"))
    ax.set_xlabel("augmentation level N (transforms per base patch)")
    ax.set_ylabel("mean validation Dice (binary)")
    ax.set_title("Figure 6: validation Dice against augmentation level")
    if levels:
        ax.set_xticks(sorted(set(levels) | {n for n, _ in paper}))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic.write_with(out / FIGURE6, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    written.append((FIGURE6, "Figure 6: validation Dice against augmentation level"))

    # Figure 7: Dice against training-set size, a line per level.
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    colours = plt.cm.plasma([i / max(len(levels) - 1, 1) * 0.85 for i in range(len(levels))])
    for colour, n in zip(colours, levels):
        xs = [s for s in subjects if _val(cells.get(_key(s, n))) is not None]
        if xs:
            ax.plot(xs, [_val(cells[_key(s, n)]) for s in xs], "o-", color=colour, label=f"{n}x")
    for b in baselines:
        xs = [s for s in subjects if _val(cells.get(_key(s, b))) is not None]
        if xs:
            ax.plot(xs, [_val(cells[_key(s, b)]) for s in xs], color="grey", linestyle=styles[b][0],
                    marker=styles[b][1], label=f"baseline: {b}")
    if PAPER_TABLE2:
        for (s, n), v in PAPER_TABLE2.items():
            ax.plot([s], [v], "*", color="black", markersize=11)
            ax.annotate(f"paper {n}x", (s, v), textcoords="offset points", xytext=(5, -12), fontsize=7)
        ax.plot([], [], "*", color="black", markersize=10, label="paper (Table II)")
    ax.set_xlabel("number of training scans")
    ax.set_ylabel("mean validation Dice (binary)")
    ax.set_title("Figure 7: validation Dice against training-set size")
    ax.set_xticks(sorted(set(subjects) | {s for s, _ in PAPER_TABLE2}))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    atomic.write_with(out / FIGURE7, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    written.append((FIGURE7, "Figure 7: validation Dice against training-set size"))
    return written
