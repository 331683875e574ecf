#!/usr/bin/env bash
# Regenerates the CPU reports in docs/results (about 4 hours on a 2-core CPU).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=docs/results
B=benchmarks
$PY $B/one_scan.py --set ivd --out $R/one-scan-ivd.md
$PY $B/bench_aug.py --out $R/bench-aug.md
$PY $B/bench_inference.py --out $R/bench-inference.md
$PY $B/bench_status.py --out $R/bench-status.md
$PY $B/bench_memory.py --out $R/bench-memory.md
# 2D against 3D, same 4-minute budget, 1 and 3 training scans
for model in 2d 3d; do
  $PY $B/one_scan.py --set vb --minutes 4 --model $model --out $R/compare-$model-vb-1scan.md
  $PY $B/one_scan.py --set vb --minutes 4 --model $model --train vb01 vb02 vb03 --out $R/compare-$model-vb-3scans.md
  $PY $B/one_scan.py --set ivd --minutes 4 --model $model --out $R/compare-$model-ivd-1scan.md
done
# the paper's grid, reduced (subjects 1 3 9, levels 5 20 50, both baselines), equal iterations per cell
$PY -m ExtremeAugLogic experiment --data ../shared/data/spine-vb --train vb01..vb10 --validate vb11..vb15 \
  --subjects 1 3 9 --levels 5 20 50 --iterations-per-cell 150 --out /tmp/grid-vb
mkdir -p $R/grid-vb && cp /tmp/grid-vb/report.md /tmp/grid-vb/*.png /tmp/grid-vb/results.json $R/grid-vb/
$PY -m ExtremeAugLogic experiment --data ../shared/data/spine-ivd --train ivd11 --validate ivd20 ivd25 \
  --subjects 1 --levels 5 20 50 --iterations-per-cell 150 --out /tmp/grid-ivd
mkdir -p $R/grid-ivd && cp /tmp/grid-ivd/report.md /tmp/grid-ivd/*.png /tmp/grid-ivd/results.json $R/grid-ivd/
# the cross-scan protocol at the default 8-minute budget, ours against the plain MONAI script
# (about 95 minutes for the vertebrae, 50 for the discs), and the disc loop (about 20 minutes)
$PY $B/generalisation.py --set vb --unlabeled --label selftrain-randconv-8min --out $R/generalisation-vb-8min-selftrain-randconv.md
$PY $B/generalisation.py --set ivd --train-cases ivd11 ivd20 ivd25 --label 8min-3scans --out $R/generalisation-ivd-8min-3scans.md
$PY $B/loop.py --set ivd --start ivd11 --rounds 2 --out $R/loop-ivd.md
# the vertebra loop with today's defaults, two warm rounds in both orders (about 20 minutes)
$PY $B/loop.py --set vb --start vb01 --rounds 2 --runs added/warm uncertainty/warm --out $R/loop-vb-randconv.md
