#!/usr/bin/env bash
# HAM10000 single site with the teacher at its native 224 px (decoded from the full 200x150 images), the
# student unchanged at 64 px: the prompt-table queue (ham10000_prompt_table.sh) with data.image_size and
# teacher.input_size set to 224, by default its identity-prompt control, 3 seeds, paired with the archived
# 128 px control (same split, same seeds, same 211 test images). The student's 64 px view is resized from
# the 224 px decode instead of the 128 px one. One 4-view teacher pass (~3x the 128 px pass) is stored in
# train.feature_cache_dir and shared by the seeds; each seed then costs its 8 cached epochs.
#
# Usage: simulations/queues/ham10000_teacher224.sh [OUT] [ARCHIVE] [VARIANT ...]
#   (default runs/ham-teacher224, docs/results-data/ham-t224, fopro-2s-identity; paths relative to the
#   repository root, as in the prompt-table queue; needs ../shared)
set -euo pipefail
OUT="${1:-runs/ham-teacher224}"
ARCHIVE="${2:-docs/results-data/ham-t224}"
shift 2 || shift $# || true
if [ $# -eq 0 ]; then set -- fopro-2s-identity; fi
EXTRA_OVERRIDES="--set data.image_size=224 --set teacher.input_size=224" exec "$(dirname "$0")/ham10000_prompt_table.sh" "$OUT" "$ARCHIVE" "$@"
