"""One table from several cross-scan reports (``generalisation.py --json`` files), side by side.

    python benchmarks/compare_generalisation.py docs/results/generalisation-explore/*.json \
        --out docs/results/generalisation-explore/README.md

Per variant: the protocol's mean over all (training scan, validation scan) pairs of binary and
per-structure Dice, the worst pair, the spread (std of the per-training-scan means), iterations,
peak memory and prediction time; for ours also the per-structure Dice of each rule that turns
probabilities into structure labels (same models, same probabilities).
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
    args = parser.parse_args()
    table = render([row for path in args.reports for row in rows_of(path)])
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
