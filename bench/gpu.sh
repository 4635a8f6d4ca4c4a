#!/usr/bin/env bash
# One-GPU measurement (bench/gpu.py): the CLIP ViT-B/16 step in bf16 at the largest batch that fits (with and
# without remat), swap at K 3000 and 65,536, MLCD at K 1M and k-means 1M x 768 -> 65,536, one JSON line each.
#   bench/gpu.sh [--budget-s 480] [--only clip,swap]   on one NVIDIA GPU, ~8 minutes
#   bench/gpu.sh --quick                               tiny sizes on CPU, seconds
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/gpu.py" "$@"
