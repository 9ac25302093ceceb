#!/usr/bin/env bash
# HAM10000 federated evidence (docs/results.md "Evidence goal"): 5 hospitals, Dirichlet 0.5, real
# MobileNetV2 teacher, 15 rounds of 60 local steps (about one pass over the pooled training data
# per round), the single-site recipe (flips only, two-stage FoPro-KD, radial prompt, prototype
# objective, prompt per site). FedAvg+BSM is the reference of the paired statistics.
#
# Resumable at round granularity: rerun the same command after a stop; finished federations are
# reused and a stopped one continues from its last server checkpoint (--skip-finished; both only
# with the same config). Teacher features of every site are kept in runs/feature-cache. Cost on
# 2 CPU cores: roughly 1-3 min per round, 35-45 min per federation on a loaded machine (stop 14), 17 min
# (FedAvg+BSM) and 27 min (FedMAS+FoPro-KD) on a quiet one (stop 21); ~2-3.5 h for the five.
# The centralised reference on the same split is the single-site table of docs/results.md
# (configs/ham10000-lt.yaml: the same lesion-grouped split; the federation additionally keeps
# 20% of each site's training images as its local test split).
#
# Usage: simulations/queues/sim_ham10000.sh [OUT] [more benchmark_methods options]
#   (default runs/sim-ham-fed, seed 0; later options win, e.g. `--seeds 0 1` or `--set federation.num_rounds=20`;
#   needs ../shared)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-runs/sim-ham-fed}"
shift || true
export HF_HUB_OFFLINE=1
exec python -m simulations.benchmark_methods --config configs/sim-ham10000.yaml --federated --out "$OUT" \
  --skip-finished --seeds 0 --reference fedavg+bsm --rare-classes df vasc akiec \
  --methods fedavg+bsm fedavg+ekd-cached fedavg+fopro-2s-radial-prototype fedmas+fopro-2s-radial-prototype \
            class_balanced+fopro-2s-radial-prototype \
  --set federation.num_rounds=15 \
  --set augment.color_jitter=[0,0,0,0] --set augment.affine_scale=[1,1] --set augment.rotation_degrees=0 \
  --set augment.affine_translate=0 --set augment.teacher_view=flips --set akd.prompt_every=2 \
  --set prompt.explore_epochs=1 --set train.feature_cache_dir=runs/feature-cache "$@"
