#!/usr/bin/env bash
# Runs N clus_jax training processes on this machine, talking over 127.0.0.1 (CPU collectives via gloo).
#
# The same multi-process code path as a TPU pod or a GPU cluster, on a laptop: each process gets
# LOCAL_DEVICES fake CPU devices, jax.distributed starts from CLUS_JAX_COORDINATOR / _NUM_PROCESSES /
# _PROCESS_ID, and the processes together form one mesh of N * LOCAL_DEVICES devices.
#
# Usage:
#   launch/local.sh [--dry-run] N [train args...]
#   launch/local.sh 2 --config configs/clip.py:steps=20,batch=16,synthetic --workdir /tmp/clus_jax/local2
#
# Environment:
#   LOCAL_DEVICES  fake CPU devices per process (default: 8 / N, at least 1)
#   PORT           coordinator port on 127.0.0.1 (default: a free port)
#   TIMEOUT        seconds before every process is stopped and the run fails (default 3600)
#   PYTHON         interpreter (default: python3)
#   PLAN=1         run the pre-flight memory plan (python -m clus_jax.plan) first and stop if it fails
#   DEVICE_MEMORY_GB  memory limit per device for the plan (default: none, the plan only reports)
#   MODULE         the python module every process runs (default clus_jax.train; e.g. clus_jax.cluster)
#   LOG_DIR        where the process logs go (default WORKDIR/logs, or OUT/logs for --out DIR)
#
# Each process logs to LOG_DIR/process_<i>.log (WORKDIR from --workdir), and its lines are also
# printed here prefixed with [i]. If one process fails, the others are stopped (SIGTERM, then SIGKILL
# after KILL_GRACE seconds) and the script exits with the failing status; 124 on timeout.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

DRY_RUN=0
while [[ $# -gt 0 && $1 == --* ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "local.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: first argument must be the number of processes" >&2; usage >&2; exit 2
fi
NPROC=$1; shift
TRAIN_ARGS=("$@")

PYTHON=${PYTHON:-python3}
LOCAL_DEVICES=${LOCAL_DEVICES:-$(( NPROC >= 8 ? 1 : 8 / NPROC ))}
TIMEOUT=${TIMEOUT:-3600}
KILL_GRACE=${KILL_GRACE:-10}
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WORKDIR=""
OUT=""
for ((i = 0; i < ${#TRAIN_ARGS[@]}; i++)); do
  case "${TRAIN_ARGS[i]}" in
    --workdir=*) WORKDIR=${TRAIN_ARGS[i]#--workdir=} ;;
    --workdir) WORKDIR=${TRAIN_ARGS[i+1]:-} ;;
    --out=*) OUT=${TRAIN_ARGS[i]#--out=} ;;
    --out) OUT=${TRAIN_ARGS[i+1]:-} ;;
  esac
done
WORKDIR=${WORKDIR:-${OUT:-}}  # a module that writes to --out (clus_jax.cluster) logs there
MODULE=${MODULE:-clus_jax.train}
if [[ -z $WORKDIR && -z ${LOG_DIR:-} ]]; then echo "local.sh: the train arguments need --workdir DIR (or set LOG_DIR)" >&2; exit 2; fi
LOG_DIR=${LOG_DIR:-$WORKDIR/logs}

# Shell-quotes a command for printing, readable and safe to paste back.
quote() {
  local out="" a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=" $a"; else out+=" '${a//\'/\'\\\'\'}'"; fi
  done
  printf '%s\n' "${out# }"
}

if [[ ${PLAN:-0} == 1 ]]; then
  plan_cmd=("$PYTHON" -m clus_jax.plan --num-devices "$((NPROC * LOCAL_DEVICES))" "${TRAIN_ARGS[@]}")
  [[ -n ${DEVICE_MEMORY_GB:-} ]] && plan_cmd+=(--device-memory-gb "$DEVICE_MEMORY_GB")
  echo "+ $(quote "${plan_cmd[@]}")"
  "${plan_cmd[@]}" || { echo "local.sh: pre-flight plan failed; not starting" >&2; exit 1; }
fi

if [[ -n ${PORT:-} ]]; then
  port=$PORT
elif [[ $DRY_RUN == 1 ]]; then
  port=PORT
else
  port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
# Fake devices per process: drop any device count inherited from the caller, then set ours.
base_flags=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g')
xla_flags="${base_flags:+$base_flags }--xla_force_host_platform_device_count=$LOCAL_DEVICES"
xla_flags=$(printf '%s' "$xla_flags" | sed -E 's/^ +//; s/ +/ /g')

env_for() {  # env_for I -> the environment of process I, as NAME=VALUE words
  printf '%s\n' "JAX_PLATFORMS=cpu" "CLUS_JAX_CPU_COLLECTIVES=gloo" "XLA_FLAGS=$xla_flags" \
    "CLUS_JAX_COORDINATOR=127.0.0.1:$port" "CLUS_JAX_NUM_PROCESSES=$NPROC" "CLUS_JAX_PROCESS_ID=$1"
}

train_cmd=("$PYTHON" -m "$MODULE" "${TRAIN_ARGS[@]}")
if [[ $DRY_RUN == 1 ]]; then
  echo "# $NPROC processes x $LOCAL_DEVICES CPU devices on 127.0.0.1:$port, logs in $LOG_DIR"
  for ((i = 0; i < NPROC; i++)); do
    mapfile -t envs < <(env_for "$i")
    echo "+ $(quote env "${envs[@]}" "${train_cmd[@]}") 2>&1 | tee $(quote "$LOG_DIR/process_$i.log")"
  done
  exit 0
fi

mkdir -p "$LOG_DIR"
pids=()
# Each process leads its own process group (setsid, where available), so stopping it also stops its children.
group=()
command -v setsid >/dev/null 2>&1 && group=(setsid)
signal_all() {  # signal_all SIG: sends SIG to every process (group) this script started
  local pid
  for pid in "${pids[@]}"; do
    if [[ ${#group[@]} -gt 0 ]]; then kill "-$1" -- "-$pid" 2>/dev/null || true; else kill "-$1" "$pid" 2>/dev/null || true; fi
  done
}
stop_all() {  # SIGTERM every process, SIGKILL the stragglers after KILL_GRACE seconds
  local pid t alive
  signal_all TERM
  for ((t = 0; t < KILL_GRACE * 10; t++)); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && break
    sleep 0.1
  done
  signal_all KILL
}
trap 'echo "local.sh: interrupted, stopping processes" >&2; stop_all; exit 130' INT TERM

echo "local.sh: $NPROC processes x $LOCAL_DEVICES CPU devices, coordinator 127.0.0.1:$port, logs in $LOG_DIR"
for ((i = 0; i < NPROC; i++)); do
  mapfile -t envs < <(env_for "$i")
  log="$LOG_DIR/process_$i.log"
  "${group[@]}" env "${envs[@]}" "${train_cmd[@]}" > >(tee "$log" | sed -u "s/^/[$i] /") 2>&1 &
  pids+=("$!")
done

status=0
start=$SECONDS
remaining=$NPROC
declare -A done_pid=()
while [[ $remaining -gt 0 ]]; do
  for i in "${!pids[@]}"; do
    pid=${pids[i]}
    [[ -n ${done_pid[$pid]:-} ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    rc=0; wait "$pid" || rc=$?
    done_pid[$pid]=1; remaining=$((remaining - 1))
    if [[ $rc != 0 ]]; then
      echo "local.sh: process $i exited with status $rc (log: $LOG_DIR/process_$i.log); stopping the others" >&2
      status=$rc
      stop_all
      break 2
    fi
  done
  if (( SECONDS - start > TIMEOUT )); then
    echo "local.sh: timed out after ${TIMEOUT}s; stopping all processes" >&2
    status=124
    stop_all
    break
  fi
  sleep 0.5
done
for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
wait 2>/dev/null || true  # the log tees
exit "$status"
