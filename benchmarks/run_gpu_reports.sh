#!/usr/bin/env bash
# The GPU figures, on a lent GPU machine whose Python has torch but not monai or SimpleITK.
#   benchmarks/run_gpu_reports.sh smoke      # ~2 min: CUDA paths of both methods, throughput of one GPU
#   benchmarks/run_gpu_reports.sh protocol   # ~9 min: vb01 vb07 vb13 -> every other vb scan, 1 min each method
#   benchmarks/run_gpu_reports.sh loop       # ~9.5 min: the vertebra loop (1 min, warm retrains of 0.25 min,
#                                            # 2 rounds), then the protocol with the worklist (self-training)
#                                            # as far as the time goes; results kept in .gpu/results between calls
#   benchmarks/run_gpu_reports.sh sweep      # ~8 min: the variants of benchmarks/sweep-variants.txt x 5 training
#                                            # scans, 12 runs at a time on the one GPU (benchmarks/sweep.py)
# Expects, beside the checkout's files: .gpu/sitk.tar.xz (an unpacked SimpleITK wheel, xz-packed to
# fit the transfer), .gpu/monai-*.whl, .gpu/data/spine-vb (a copy of the shared scans); writes to $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 EXTREMEAUG_DATA=$PWD/.gpu/data
SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if ! $PY -c "import SimpleITK, monai" 2>/dev/null; then
  tar xJf .gpu/sitk.tar.xz -C "$SITE" && $PY -m pip install -q --no-index --no-deps --no-compile .gpu/monai-*.whl || exit 1
fi
$PY -c "import torch, monai, SimpleITK; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0), '| monai', monai.__version__, '| SimpleITK', SimpleITK.Version_VersionString())" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-smoke}" in
  smoke)
    timeout 150 $PY benchmarks/generalisation.py --set vb --quick --device cuda --out "$OUT/generalisation-quick-gpu.md" 2>&1 | tail -25
    timeout 90 $PY benchmarks/bench_distributed.py --device cuda --processes 1 --seconds 30 --skip-target \
      --out "$OUT/bench-distributed-gpu.md" 2>&1 | tail -15 ;;
  protocol)
    timeout ${PROTOCOL_SECONDS:-520} $PY benchmarks/generalisation.py --set vb --device cuda --minutes ${MINUTES:-1} \
      --train-cases ${TRAIN_CASES:-vb01 vb07 vb13} --label gpu-1min --out "$OUT/generalisation-vb-gpu-1min.md" 2>&1 | tail -40 ;;
  loop)
    mkdir -p .gpu/results
    timeout ${LOOP_SECONDS:-300} $PY benchmarks/loop.py --set vb --start vb01 --rounds 2 --minutes 1 \
      --retrain-minutes 0.25 --runs added/warm --out .gpu/results/loop-vb-gpu.md 2>&1 | tail -12
    cp .gpu/results/*.md .gpu/results/*.json .gpu/results/*.png "$OUT"/ 2>/dev/null
    timeout ${PROTOCOL_SECONDS:-250} $PY benchmarks/generalisation.py --set vb --device cuda --minutes 1 --unlabeled \
      --train-cases ${TRAIN_CASES:-vb01 vb07 vb13 vb04 vb10} --label gpu-1min-selftrain \
      --out .gpu/results/generalisation-vb-gpu-1min-selftrain.md 2>&1 | tail -30
    cp .gpu/results/*.md .gpu/results/*.json .gpu/results/*.png "$OUT"/ 2>/dev/null ;;
  sweep)
    mkdir -p .gpu/sweep
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 15 > .gpu/sweep/gpu-load.csv 2>&1 &
    timeout ${SWEEP_SECONDS:-500} $PY benchmarks/sweep.py --variants ${VARIANTS:-benchmarks/sweep-variants.txt} \
      --out-dir .gpu/sweep --device cuda --jobs ${JOBS:-12} --deadline-min ${DEADLINE_MIN:-7.3} 2>&1 | tail -50
    kill %1 2>/dev/null
    tar czf "$OUT/sweep.tgz" -C .gpu sweep ;;
esac
ls -la "$OUT"
