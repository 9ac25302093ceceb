#!/usr/bin/env bash
# HAM10000 single site, the prompt table of docs/results.md: the identity-prompt control and FoPro-KD
# two-stage with each objective x {free, radial}, 3 seeds each, on the split of configs/ham10000-lt.yaml.
#
# Grows over sessions (benchmark_methods --archive): a run already archived in ARCHIVE (default
# docs/results-data/ham-s15) is copied into OUT before its turn and reused by --skip-finished (only when its
# config snapshot is the experiment it would run: the same settings and files, caches anywhere); every run is
# archived there as soon as it finishes (~22 kB, no pixels), so commit ARCHIVE after a session. Variants run in the order below,
# one at a time; a stopped run continues after its last complete epoch. Cost on 2 CPU cores: the control
# ~13 min a seed once its teacher features are stored (the first seed adds one 4-view teacher pass,
# ~8-11 min), a prompt variant ~20-25 min a seed (exploration epoch, its own 4-view cache, 7 cached epochs).
#
# Usage: simulations/queues/ham10000_prompt_table.sh [OUT] [ARCHIVE] [VARIANT ...]
#   (default runs/ham-prompt-table, docs/results-data/ham-s15, every variant below; needs ../shared)
#   EXTRA_OVERRIDES="--set key=value ..." adds settings to every run (ham10000_teacher224.sh uses it).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-runs/ham-prompt-table}"
ARCHIVE="${2:-docs/results-data/ham-s15}"
shift 2 || shift $# || true
VARIANTS=("$@")
if [ ${#VARIANTS[@]} -eq 0 ]; then
  VARIANTS=(fopro-2s-identity fopro-2s-free-discriminative fopro-2s-radial-bn_stats fopro-2s-free-bn_stats
            fopro-2s-radial-prototype fopro-2s-radial-minmax fopro-2s-free-prototype fopro-2s-free-minmax
            fopro-2s-radial-discriminative ekd-cached)
fi
export HF_HUB_OFFLINE=1
for variant in "${VARIANTS[@]}"; do
  python -m simulations.benchmark_methods --config configs/ham10000-lt.yaml --out "$OUT/$variant" --skip-finished \
    --archive "$ARCHIVE" --methods "$variant" --seeds 0 1 2 --rare-classes df vasc akiec \
    --set train.feature_cache_dir=runs/feature-cache ${EXTRA_OVERRIDES:-}
done
