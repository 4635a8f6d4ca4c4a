#!/usr/bin/env bash
# Trains clus_jax on a Cloud TPU VM pod slice: plan, create or reuse the slice, copy the code to every
# worker, install, run the trainer on all workers at once, stream the log here, optionally delete the slice.
#
# Usage:
#   TPU_NAME=clus-v5p ZONE=us-east5-a ACCELERATOR_TYPE=v5p-32 CONFIG=configs/clip.py:size=B/16 \
#     WORKDIR=gs://BUCKET/clus_jax/clip_b16 launch/tpu_pod.sh [--dry-run] [--teardown] [--skip-setup] [-- TRAIN ARGS...]
#
# Environment:
#   TPU_NAME          name of the TPU VM slice (required)
#   PROJECT           GCP project (default: gcloud's configured project)
#   ZONE              zone of the slice (required)
#   ACCELERATOR_TYPE  slice type, e.g. v4-32, v5p-32, v5litepod-16, v6e-16 (default v5p-32)
#   RUNTIME_VERSION   TPU VM software version (default chosen from ACCELERATOR_TYPE)
#   CONFIG            config spec, e.g. configs/clip.py:size=B/16,batch=4096 (required for training)
#   WORKDIR           run directory every worker can reach, e.g. gs://BUCKET/run (required for training)
#   EXTRA_ARGS        more trainer arguments, e.g. "--config.optim.lr=3e-4 --config.mesh.fsdp=4"
#   MODULE            python module to run on every worker (default clus_jax.train); any other module
#                     (e.g. clus_jax.cluster) gets EXTRA_ARGS alone, needs no CONFIG or WORKDIR, and no plan
#   RUN_NAME          names the local log file (default: TPU_NAME)
#   LOG_FILE          local log file (default runs/logs/tpu_<RUN_NAME>_<time>.log)
#   SYNC              scp (default: the working tree, tracked and untracked-but-not-ignored files)
#                     or git (clone GIT_REPO at GIT_REF on every worker)
#   GIT_REPO, GIT_REF repository URL and commit/branch/tag for SYNC=git (GIT_REF default: current HEAD)
#   REMOTE_DIR        code directory on the workers (default clus_jax)
#   SPOT=1            create the slice as a Spot VM
#   TEARDOWN=1        delete the slice when the run ends (same as --teardown)
#   SKIP_SETUP=1      reuse the code and venv already on the workers (same as --skip-setup)
#   DEVICE_MEMORY_GB  memory per device for the pre-flight plan (default from ACCELERATOR_TYPE)
#   SKIP_PLAN=1       skip the pre-flight plan (python -m clus_jax.plan, run here on CPU)
#   LIBTPU_INIT_ARGS  TPU compiler flags passed to the trainer on every worker (default: none)
#   PYTHON            local python with clus_jax installed, for the plan (default python3)
#
# --dry-run prints every command and runs none of them, except the pre-flight plan, which only reads the
# config and compiles on this machine's CPU (set SKIP_PLAN=1 to skip it too).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

DRY_RUN=0
TEARDOWN=${TEARDOWN:-0}
SKIP_SETUP=${SKIP_SETUP:-0}
TRAIN_EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --teardown) TEARDOWN=1 ;;
    --skip-setup) SKIP_SETUP=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_EXTRA=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

MODULE=${MODULE:-clus_jax.train}
required=(TPU_NAME ZONE)
if [[ $MODULE == clus_jax.train ]]; then required+=(CONFIG WORKDIR); else SKIP_PLAN=1; fi
missing=()
for v in "${required[@]}"; do [[ -n ${!v:-} ]] || missing+=("$v"); done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "tpu_pod.sh: set ${missing[*]}" >&2; usage >&2; exit 2
fi
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-32}
REMOTE_DIR=${REMOTE_DIR:-clus_jax}
SYNC=${SYNC:-scp}
PYTHON=${PYTHON:-python3}
RUN_NAME=${RUN_NAME:-$TPU_NAME}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LOG_FILE=${LOG_FILE:-runs/logs/tpu_${RUN_NAME}_$(date +%Y%m%d_%H%M%S).log}

# Devices JAX sees and memory per device: v2/v3 expose each TensorCore as a device; v4 and v5p are
# megacore (one device per chip, the name counts cores); v5e and v6e have one core per chip.
family=${ACCELERATOR_TYPE%-*}
count=${ACCELERATOR_TYPE##*-}
case "$family" in
  v2) devices=$count; hbm=8; runtime=tpu-ubuntu2204-base ;;
  v3) devices=$count; hbm=16; runtime=tpu-ubuntu2204-base ;;
  v4) devices=$((count / 2)); hbm=32; runtime=tpu-ubuntu2204-base ;;
  v5p) devices=$((count / 2)); hbm=95; runtime=v2-alpha-tpuv5 ;;
  v5litepod|v5e) devices=$count; hbm=16; runtime=v2-alpha-tpuv5-lite ;;
  v6e) devices=$count; hbm=32; runtime=v2-alpha-tpuv6e ;;
  *) echo "tpu_pod.sh: unknown ACCELERATOR_TYPE $ACCELERATOR_TYPE (e.g. v4-32, v5p-32, v5litepod-16, v6e-16)" >&2; exit 2 ;;
esac
RUNTIME_VERSION=${RUNTIME_VERSION:-$runtime}
DEVICE_MEMORY_GB=${DEVICE_MEMORY_GB:-$hbm}

read -r -a extra_words <<< "${EXTRA_ARGS:-}"
if [[ $MODULE == clus_jax.train ]]; then
  TRAIN_ARGS=(--config "$CONFIG" --workdir "$WORKDIR" "${extra_words[@]}" "${TRAIN_EXTRA[@]}")
else
  TRAIN_ARGS=("${extra_words[@]}" "${TRAIN_EXTRA[@]}")
fi

# Shell-quotes words for printing: readable, and safe to paste back.
quote() {
  local out="" a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=" $a"; else out+=" '${a//\'/\'\\\'\'}'"; fi
  done
  printf '%s\n' "${out# }"
}
run() {  # prints a command, then runs it unless --dry-run
  echo "+ $(quote "$@")"
  [[ $DRY_RUN == 1 ]] || "$@"
}

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
[[ -n ${PROJECT:-} ]] && where+=(--project="$PROJECT")

# 1. Pre-flight plan, for the slice's device count, on this machine's CPU. Refuses to launch if it fails.
if [[ ${SKIP_PLAN:-0} != 1 ]]; then
  plan_cmd=("$PYTHON" -m clus_jax.plan --num-devices "$devices" --device-memory-gb "$DEVICE_MEMORY_GB" "${TRAIN_ARGS[@]}")
  echo "+ $(quote "${plan_cmd[@]}")"
  if ! "${plan_cmd[@]}"; then
    echo "tpu_pod.sh: pre-flight plan failed for $ACCELERATOR_TYPE ($devices devices, ${DEVICE_MEMORY_GB} GiB each); not launching" >&2
    exit 1
  fi
fi

# 2. Create the slice unless it exists.
create=("${gcloud_tpu[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
[[ ${SPOT:-0} == 1 ]] && create+=(--spot)
describe=("${gcloud_tpu[@]}" describe "$TPU_NAME" "${where[@]}" --format=value\(state\))
if [[ $DRY_RUN == 1 ]]; then
  echo "+ $(quote "${describe[@]}")"
  echo "# only if the slice does not exist yet:"
  echo "+ $(quote "${create[@]}")"
elif state=$("${describe[@]}" 2>/dev/null); then
  echo "tpu_pod.sh: reusing $TPU_NAME (state $state)"
else
  run "${create[@]}"
fi

ssh_all() {  # ssh_all COMMAND: runs COMMAND on every worker of the slice
  run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

# 3. Code on every worker, 4. environment on every worker.
if [[ $SKIP_SETUP != 1 ]]; then
  if [[ $SYNC == git ]]; then
    [[ -n ${GIT_REPO:-} ]] || { echo "tpu_pod.sh: SYNC=git needs GIT_REPO" >&2; exit 2; }
    ref=${GIT_REF:-$(git rev-parse HEAD 2>/dev/null || echo main)}
    ssh_all "set -e; [ -d $(quote "$REMOTE_DIR")/.git ] || git clone $(quote "$GIT_REPO") $(quote "$REMOTE_DIR"); cd $(quote "$REMOTE_DIR") && git fetch --all --tags && git checkout --force $(quote "$ref")"
  elif [[ $SYNC == scp ]]; then
    tarball=${TMPDIR:-/tmp}/clus_jax_src_$$.tar.gz
    if [[ $DRY_RUN == 1 ]]; then
      echo "+ git ls-files -z --cached --others --exclude-standard | tar czf $(quote "$tarball") --null -T -"
    else
      git ls-files -z --cached --others --exclude-standard | tar czf "$tarball" --null -T -
    fi
    run "${gcloud_tpu[@]}" scp "$tarball" "$TPU_NAME:clus_jax_src.tar.gz" "${where[@]}" --worker=all
    ssh_all "set -e; mkdir -p $(quote "$REMOTE_DIR") && tar xzf clus_jax_src.tar.gz -C $(quote "$REMOTE_DIR")"
    [[ $DRY_RUN == 1 ]] || rm -f "$tarball"
  else
    echo "tpu_pod.sh: SYNC must be scp or git, got $SYNC" >&2; exit 2
  fi
  ssh_all "set -e; cd $(quote "$REMOTE_DIR") && python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip && pip install -q -e . 'jax[tpu]>=0.10,<0.13'"
fi

# 5. Train on all workers at once; jax.distributed finds the pod's coordinator from the TPU metadata.
tpu_env=""
[[ -n ${LIBTPU_INIT_ARGS:-} ]] && tpu_env="LIBTPU_INIT_ARGS=$(quote "$LIBTPU_INIT_ARGS") "
train_remote="cd $(quote "$REMOTE_DIR") && . .venv/bin/activate && ${tpu_env}CLUS_JAX_DISTRIBUTED=auto python -m $(quote "$MODULE") $(quote "${TRAIN_ARGS[@]}")"
echo "# output of all workers is appended to $LOG_FILE"
status=0
if [[ $DRY_RUN == 1 ]]; then
  ssh_all "$train_remote"
else
  mkdir -p "$(dirname "$LOG_FILE")"
  ssh_all "$train_remote" 2>&1 | tee -a "$LOG_FILE" || status=$?
fi

# 6. Optional teardown, also after a failed run (a idle slice still bills).
if [[ $TEARDOWN == 1 ]]; then
  run "${gcloud_tpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
fi
if [[ $status != 0 ]]; then echo "tpu_pod.sh: training failed with status $status (log: $LOG_FILE)" >&2; fi
exit "$status"
