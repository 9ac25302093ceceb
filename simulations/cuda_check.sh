#!/usr/bin/env bash
# One short CUDA check of the single-site paths (no Flower or Ray needed): the README's demo job,
# local DP-SGD (full student and frozen public backbone) and the step benchmark.
#
#   OUT=/tmp/cuda-out bash simulations/cuda_check.sh
#
# Environment: FOPRO_KD_CACHE may hold a cached demo teacher (else it is pretrained first);
# opacus must be importable. Each step has its own time limit so that one slow step cannot eat
# the rest; every run directory stays under /tmp and only metrics come back under $OUT.
set -u
OUT=${OUT:?set OUT to a folder for the results}
WORK=${WORK:-/tmp/fopro-kd-cuda}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT" "$WORK"
CLI=(python3 -c "import sys; from fopro_kd.cli import main; sys.exit(main())")  # `timeout` runs no shell functions
step() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc wall=$((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  tail -n 6 "$WORK/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.txt"
python3 -c "import torch, timm, opacus; print('torch', torch.__version__, 'timm', timm.__version__, 'opacus', opacus.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/summary.txt"

step demo 150 "${CLI[@]}" train --config configs/demo.yaml --set device=cuda --out "$WORK/demo"
DP=(--config configs/sim-demo-dp.yaml --set device=cuda --set train.epochs=2 --set federation.local_epochs=2
    --set privacy.planned_rounds=1)
step dp-full 120 "${CLI[@]}" train "${DP[@]}" --set student.init=random --set student.freeze_backbone=false --out "$WORK/dp-full"
step dp-frozen 90 "${CLI[@]}" train "${DP[@]}" --out "$WORK/dp-frozen"  # the config's frozen public backbone
[ -n "${SKIP_BENCH:-}" ] || step bench-step 200 python3 -m simulations.bench step --device cuda --json "$OUT/bench-step-cuda.json"

for name in demo dp-full dp-frozen; do
  [ -f "$WORK/$name/metrics.json" ] && cp "$WORK/$name/metrics.json" "$OUT/$name-metrics.json"
done
[ -f "$WORK/bench-step.log" ] && tail -n 40 "$WORK/bench-step.log" > "$OUT/bench-step.txt"
