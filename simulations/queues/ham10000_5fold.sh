#!/usr/bin/env bash
# HAM10000 single site, lesion-grouped 5-fold cross-validation, BSM vs EKD vs two-stage FoPro-KD
# (the protocol of docs/results.md "Statistics used"; every image tested once).
#
# Resumable and grows over sessions: rerun the same command after a stop: finished runs are reused, a stopped
# run continues after its last complete epoch (--skip-finished; a run is reused only when its config snapshot
# equals the one it would get), and every finished run is archived at once in ARCHIVE (--archive, ~22 kB a
# run, no pixels: commit it), from where a fresh checkout restores it. Teacher features
# are kept per image in runs/feature-cache (train.feature_cache_dir): after the first folds have
# passed over the data, later EKD folds (and resumed runs) run no teacher. Cost on 2 CPU cores: BSM 7-12 min, EKD 8-25 min
# (the first fold's 4-view teacher pass), FoPro-KD 12-35 min per fold: 2.5 h (quiet machine, stop 20) to ~6 h for the 15 runs.
#
# Usage: simulations/queues/ham10000_5fold.sh [OUT] [ARCHIVE]
#   (default runs/ham-5fold, docs/results-data/ham-5fold; needs ../shared)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-runs/ham-5fold}"
ARCHIVE="${2:-docs/results-data/ham-5fold}"
export HF_HUB_OFFLINE=1
exec python -m simulations.benchmark_methods --config configs/ham10000-lt.yaml --out "$OUT" --skip-finished \
  --archive "$ARCHIVE" \
  --methods ekd-cached bsm fopro-2s-radial-prototype --seeds 0 --folds 5 --reference ekd-cached \
  --rare-classes df vasc akiec \
  --set augment.color_jitter=[0,0,0,0] --set augment.affine_scale=[1,1] --set augment.rotation_degrees=0 \
  --set augment.affine_translate=0 --set augment.teacher_view=flips --set akd.prompt_every=2 \
  --set prompt.explore_epochs=1 --set train.feature_cache_dir=runs/feature-cache
