"""One table from several cross-scan reports (``generalisation.py --json`` files), side by side.

    python benchmarks/compare_generalisation.py docs/results/generalisation-explore/*.json \
        --out docs/results/generalisation-explore/README.md

Per variant: the protocol's mean over all (training scan, validation scan) pairs of binary and
per-structure Dice, the worst pair, the spread (std of the per-training-scan means), iterations,
peak memory and prediction time; for ours also the per-structure Dice of each rule that turns
probabilities into structure labels (same models, same probabilities).

    python benchmarks/compare_generalisation.py A.json B.json --paired ours

``--paired METHOD``: B against A, pair by pair (same training scan, same validation scan, the runs of
METHOD that both files hold): per training scan and over all pairs, the mean binary and per-structure
Dice of each, the pairs where B is better or worse by more than 0.01 binary, and the level-shifted pairs
(per-structure Dice more than 0.1 below binary: every level named one off looks like that).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def rows_of(path: Path) -> list[dict]:
    results = json.loads(path.read_text())
    label = results["config"].get("label") or path.stem
    out = []
    for method in sorted({run["method"] for run in results["runs"].values()}):
        runs = [run for run in results["runs"].values() if run["method"] == method]
        pairs = [(run["train_case"], case, s) for run in runs for case, s in run["scores"].items()]
        run_means = [np.mean([s["binary_dice"] for s in run["scores"].values()]) for run in runs]
        worst = min(pairs, key=lambda p: p[2]["binary_dice"])
        row = {"variant": f"{method}: {label}", "runs": len(runs), "pairs": len(pairs),
               "binary": np.mean([p[2]["binary_dice"] for p in pairs]),
               "per_structure": np.mean([p[2]["mean_dice"] for p in pairs]),
               "worst": f"{worst[0]} -> {worst[1]} {worst[2]['binary_dice']:.3f}",
               "spread": float(np.std(run_means, ddof=1)) if len(run_means) > 1 else None,
               "iterations": np.mean([run["iterations"] for run in runs]),
               "peak": max((run.get("peak_rss_mib") or 0) for run in runs),
               "predict_s": np.mean([p[2]["predict_s"] for p in pairs])}
        for rule in ("off", "ordered"):
            by_rule = [s for run in runs for s in (run.get("scores_by_objects_rule") or {}).get(rule, {}).values()]
            row[rule] = np.mean([s["mean_dice"] for s in by_rule]) if by_rule else None
        out.append(row)
    return out


SHIFT_GAP = 0.1  # binary minus per-structure Dice above which a pair counts as level-shifted
BETTER = 0.01  # binary Dice difference that counts a pair as better or worse


def paired_rows(a_path: Path, b_path: Path, method: str) -> list[dict]:
    """One row per training scan both files ran with ``method``, then one for all their pairs."""
    a_runs, b_runs = ({run["train_case"]: run for run in json.loads(p.read_text())["runs"].values()
                       if run["method"] == method} for p in (a_path, b_path))
    rows, every = [], []
    for case in [c for c in a_runs if c in b_runs]:
        common = [v for v in a_runs[case]["scores"] if v in b_runs[case]["scores"]]
        pairs = [(a_runs[case]["scores"][v], b_runs[case]["scores"][v], v) for v in common]
        every += pairs
        rows.append(_paired_row(case, pairs, a_runs[case]["iterations"], b_runs[case]["iterations"]))
    if rows:
        rows.append(_paired_row(f"all {len(rows)} training scans", every,
                                np.mean([a_runs[r["train"]]["iterations"] for r in rows]),
                                np.mean([b_runs[r["train"]]["iterations"] for r in rows])))
    return rows


def _paired_row(name: str, pairs: list, a_iterations: float, b_iterations: float) -> dict:
    def shifted(s):
        return s["binary_dice"] - s["mean_dice"] > SHIFT_GAP

    diff = [b["binary_dice"] - a["binary_dice"] for a, b, _ in pairs]
    return {"train": name, "pairs": len(pairs),
            "a": (np.mean([a["binary_dice"] for a, _, _ in pairs]), np.mean([a["mean_dice"] for a, _, _ in pairs])),
            "b": (np.mean([b["binary_dice"] for _, b, _ in pairs]), np.mean([b["mean_dice"] for _, b, _ in pairs])),
            "worst": (min(a["binary_dice"] for a, _, _ in pairs), min(b["binary_dice"] for _, b, _ in pairs)),
            "better": sum(d > BETTER for d in diff), "worse": sum(d < -BETTER for d in diff),
            "shifted": ([v for a, _, v in pairs if shifted(a)], [v for _, b, v in pairs if shifted(b)]),
            "iterations": (a_iterations, b_iterations)}


def render_paired(rows: list[dict], a_name: str, b_name: str) -> str:
    lines = [f"A: {a_name}; B: {b_name}", "",
             "| training scan | pairs | A binary / per-structure | B binary / per-structure | B - A binary | "
             f"B better / worse (> {BETTER}) | worst pair A / B | level-shifted pairs A -> B | iterations A / B |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shift_a, shift_b = r["shifted"]
        lines.append(f"| {r['train']} | {r['pairs']} | {r['a'][0]:.3f} / {r['a'][1]:.3f} | {r['b'][0]:.3f} / {r['b'][1]:.3f} | "
                     f"{r['b'][0] - r['a'][0]:+.3f} | {r['better']} / {r['worse']} | {r['worst'][0]:.3f} / {r['worst'][1]:.3f} | "
                     f"{len(shift_a)} -> {len(shift_b)}"
                     + ("" if r is rows[-1] else f" ({', '.join(shift_a) or '-'} -> {', '.join(shift_b) or '-'})")
                     + f" | {r['iterations'][0]:.0f} / {r['iterations'][1]:.0f} |")
    return "\n".join(lines) + "\n"


def render(rows: list[dict]) -> str:
    def f(v, fmt=".3f"):
        return "-" if v is None else format(v, fmt)

    lines = ["| variant | runs / pairs | binary Dice | per-structure Dice | per-structure, voxel argmax | "
             "per-structure, ordered | worst pair (binary) | spread | iterations | peak MiB | predict s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['runs']} / {r['pairs']} | **{r['binary']:.3f}** | {r['per_structure']:.3f} | "
                     f"{f(r['off'])} | {f(r['ordered'])} | {r['worst']} | {f(r['spread'])} | {r['iterations']:.0f} | "
                     f"{r['peak']:.0f} | {r['predict_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--out")
    parser.add_argument("--paired", metavar="METHOD", help="two reports: the second against the first, pair by pair")
    args = parser.parse_args()
    if args.paired:
        if len(args.reports) != 2:
            parser.error("--paired compares exactly two reports")
        rows = paired_rows(*args.reports, args.paired)
        if not rows:
            parser.error(f"the two reports share no training scan run with {args.paired}")
        table = render_paired(rows, *(str(p) for p in args.reports))
    else:
        table = render([row for path in args.reports for row in rows_of(path)])
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
