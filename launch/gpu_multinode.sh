#!/usr/bin/env bash
# Starts one clus_jax training process of a multi-host GPU job (run it once per node, or once per GPU).
#
# Works under any scheduler, or none: give each process the coordinator's address, the process count and
# its own index. launch/gpu_slurm.sbatch calls this script for every SLURM task.
#
# Usage (two 8-GPU nodes, one process per node, run on each node with its own PROCESS_ID):
#   COORDINATOR=node0:12355 NUM_PROCESSES=2 PROCESS_ID=0 CONFIG=configs/clip.py:size=B/16 \
#     WORKDIR=/shared/runs/clip_b16 launch/gpu_multinode.sh [--dry-run] [-- TRAIN ARGS...]
#
# Environment:
#   COORDINATOR       host:port of process 0's coordinator service (reachable from every node)
#   NUM_PROCESSES     processes in the job          (default: SLURM_NTASKS)
#   PROCESS_ID        this process's index, 0-based (default: SLURM_PROCID)
#   INIT=auto         let jax.distributed detect SLURM / Open MPI itself instead of the three above
#   LOCAL_GPU         pin this process to one GPU (sets CUDA_VISIBLE_DEVICES), for one process per GPU
#   GPU_PER_PROCESS=1 pin to the GPU of this task's local rank (SLURM_LOCALID or LOCAL_RANK)
#   CONFIG, WORKDIR   config spec and run directory on a filesystem all nodes share (required)
#   EXTRA_ARGS        more trainer arguments, e.g. "--config.mesh.fsdp=8"
#   MODULE            python module to run (default clus_jax.train); any other module (clus_jax.cluster)
#                     gets EXTRA_ARGS alone and needs no CONFIG or WORKDIR
#   MEM_FRACTION      XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.9)
#   XLA_FLAGS         extra XLA flags; they come after the defaults below, so they override them
#   PYTHON            interpreter (default python3)
#
# --dry-run prints the environment and the command instead of running it.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

DRY_RUN=0
TRAIN_EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_EXTRA=("$@"); break ;;
    *) echo "gpu_multinode.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
MODULE=${MODULE:-clus_jax.train}
if [[ $MODULE == clus_jax.train ]]; then
  for v in CONFIG WORKDIR; do
    [[ -n ${!v:-} ]] || { echo "gpu_multinode.sh: set $v" >&2; usage >&2; exit 2; }
  done
fi

# XLA flags that matter for multi-GPU throughput (all checked against XLA's flag list by the tests).
GPU_XLA_FLAGS=(
  # Schedules collectives (FSDP all-gathers, gradient all-reduces/reduce-scatters) asynchronously and
  # overlaps them with independent compute instead of running them back to back.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # cuBLAS for matmuls: the ViT and text-transformer GEMMs are large, regular bf16 shapes where cuBLAS is
  # as fast as Triton, and skipping Triton's autotuning shortens compiles. Override with =true to compare.
  --xla_gpu_enable_triton_gemm=false
  # Merge the many small per-layer collectives into few large ones (fewer NCCL launches, closer to peak
  # bandwidth); 128 MiB holds several layers' gradients of a ViT-L.
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
  # Run collectives on the highest-priority stream so compute kernels do not delay them.
  --xla_gpu_enable_highest_priority_async_stream=true
)
# Share of GPU memory XLA preallocates (default 0.75): more room for activations; the rest is left for
# cuDNN/NCCL workspaces. The pre-flight plan's default memory limit assumes 0.9 of the card.
MEM_FRACTION=${MEM_FRACTION:-0.9}
PYTHON=${PYTHON:-python3}

envs=(
  "XLA_FLAGS=${GPU_XLA_FLAGS[*]}${XLA_FLAGS:+ $XLA_FLAGS}"
  "XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION"
)
if [[ ${INIT:-} == auto ]]; then
  envs+=("CLUS_JAX_DISTRIBUTED=auto")
else
  num=${NUM_PROCESSES:-${SLURM_NTASKS:-}}
  pid=${PROCESS_ID:-${SLURM_PROCID:-}}
  if [[ -z ${COORDINATOR:-} || -z $num || -z $pid ]]; then
    echo "gpu_multinode.sh: set COORDINATOR, NUM_PROCESSES and PROCESS_ID (or INIT=auto)" >&2; exit 2
  fi
  envs+=("CLUS_JAX_COORDINATOR=$COORDINATOR" "CLUS_JAX_NUM_PROCESSES=$num" "CLUS_JAX_PROCESS_ID=$pid")
fi
# One process per GPU: task SLURM_LOCALID (or LOCAL_RANK) takes the matching entry of the visible GPUs,
# unless the scheduler already left it exactly one (--gpus-per-task=1).
if [[ -z ${LOCAL_GPU:-} && ${GPU_PER_PROCESS:-0} == 1 && ${CUDA_VISIBLE_DEVICES:-,} == *,* ]]; then
  local_rank=${SLURM_LOCALID:-${LOCAL_RANK:-0}}
  IFS=, read -r -a visible <<< "${CUDA_VISIBLE_DEVICES:-}"
  LOCAL_GPU=${visible[local_rank]:-$local_rank}
fi
[[ -n ${LOCAL_GPU:-} ]] && envs+=("CUDA_VISIBLE_DEVICES=$LOCAL_GPU")

read -r -a extra_words <<< "${EXTRA_ARGS:-}"
if [[ $MODULE == clus_jax.train ]]; then
  cmd=("$PYTHON" -m clus_jax.train --config "$CONFIG" --workdir "$WORKDIR" "${extra_words[@]}" "${TRAIN_EXTRA[@]}")
else
  cmd=("$PYTHON" -m "$MODULE" "${extra_words[@]}" "${TRAIN_EXTRA[@]}")
fi

quote() {
  local out="" a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=" $a"; else out+=" '${a//\'/\'\\\'\'}'"; fi
  done
  printf '%s\n' "${out# }"
}

if [[ $DRY_RUN == 1 ]]; then
  for e in "${envs[@]}"; do echo "export $(quote "$e")"; done
  echo "+ $(quote "${cmd[@]}")"
  exit 0
fi
exec env "${envs[@]}" "${cmd[@]}"
