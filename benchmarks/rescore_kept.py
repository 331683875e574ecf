"""Score the labelling rules again on the models a ``generalisation.py --keep`` run left behind.

    python benchmarks/rescore_kept.py docs/results/x.json /tmp/generalisation-ours-vb01-* ... --out docs/results/y.md

Each work folder (``generalisation-ours-<case>-*``, kept by ``--keep``) holds the workspace of one of
the results file's "ours" runs; its model predicts the run's validation scans again and every rule
(``generalisation.score_version``, new rules included) is scored on the same probabilities. The
training figures (iterations, time, memory) stay those of the original run. Writes the results
file given by ``--out`` (``.json`` beside it) and its report; the original file is not changed.
Runs already rescored in that ``.json`` are taken from it, so it can be called as runs finish.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

from common import require_data
from generalisation import SETS, plot, render, run_stats, save_results, score_version


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a generalisation.py results file (.json)")
    parser.add_argument("work", type=Path, nargs="+", help="work folders kept by generalisation.py --keep")
    parser.add_argument("--out", type=Path, required=True, help="the new report (.md; its .json beside it)")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    cfg = results["config"]
    data = require_data(SETS[cfg["set"]]["folder"])
    labels = sorted(int(k) for k in cfg["names"])
    out_json = args.out.with_suffix(".json")
    earlier = json.loads(out_json.read_text())["runs"] if out_json.is_file() else {}
    for key, run in earlier.items():
        if run.get("rescored_at") and key in results["runs"]:
            results["runs"][key].update({k: run[k] for k in ("scores", "scores_by_objects_rule", "rescored_at")})
    for folder in args.work:
        match = re.match(r"generalisation-ours-(.+?)-[^-]+$", folder.name)
        run = results["runs"].get(f"ours/{match.group(1)}") if match else None
        if run is None or not (folder / "ws").is_dir():
            sys.exit(f"{folder}: not a kept 'ours' work folder of a run in {args.results}")
        if run.get("rescored_at"):
            continue
        _, scores, by_rule = score_version(folder / "ws", run["version"], run["train_case"], run["validation_cases"],
                                           cfg["device"], data, labels)
        run.update(scores=scores, scores_by_objects_rule=by_rule, rescored_at=time.strftime("%Y-%m-%d %H:%M:%S"))
        s = run_stats(run)
        print(f"ours {run['train_case']}: binary {s['binary']:.3f}, per-structure {s['per_structure']:.3f}; "
              + ", ".join(f"{rule} {sum(v['mean_dice'] for v in by.values()) / len(by):.3f}"
                          for rule, by in by_rule.items()), flush=True)
    command = "python benchmarks/rescore_kept.py " + shlex.join(sys.argv[1:] if argv is None else map(str, argv))
    cfg["command"] = f"{cfg['command']}`, then `{command}"  # the report shows it as two commands
    save_results(out_json, results)
    plot(results, args.out.with_suffix(".png"))
    args.out.write_text(render(results, cfg["command"], args.out.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
