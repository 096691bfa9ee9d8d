#!/usr/bin/env bash
# Train on one node with N GPUs.
#
#   CONFIG=experiments/hubert.py:paper WORKDIR=runs/hubert_base NUM_GPUS=8 \
#     launch/gpu.sh [--dry-run] [-- --config.data.manifest=/data/ls960.jsonl ...]
#
# MODE=single (default): one process drives all NUM_GPUS GPUs (CUDA_VISIBLE_DEVICES=0..N-1); the
#   mesh's data axis takes them all (--config.mesh.shape.data=-1 unless you pass a mesh).
# MODE=per-gpu: one process per GPU joined by jax.distributed on localhost
#   (--coordinator_address 127.0.0.1:PORT --num_processes N --process_id I): the multi-host code
#   path on one machine. If one process fails the others are stopped.
# Required: CONFIG WORKDIR. Optional: NUM_GPUS (default: all of nvidia-smi -L), MODE, PORT (12355),
#   PYTHON (default .venv/bin/python). Install: pip install 'jax[cuda12]==0.10.2' -r requirements.txt
# Everything after `--` is passed to jaxspeech.main. --dry-run prints each command instead.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu.sh: $*" >&2; exit 2; }

DRY_RUN=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (arguments for jaxspeech.main go after '--')" ;;
  esac
done

missing=()
for v in CONFIG WORKDIR; do [[ -n "${!v:-}" ]] || missing+=("$v"); done
[[ ${#missing[@]} -eq 0 ]] || die "set ${missing[*]} (see --help); e.g. \
CONFIG=experiments/hubert.py:paper WORKDIR=runs/hubert_base NUM_GPUS=8"
MODE=${MODE:-single}
[[ $MODE == single || $MODE == per-gpu ]] || die "MODE must be single or per-gpu, got '$MODE'"
if [[ -z "${NUM_GPUS:-}" ]]; then
  command -v nvidia-smi >/dev/null || die "set NUM_GPUS (nvidia-smi not found to count GPUs)"
  NUM_GPUS=$(nvidia-smi -L | grep -c '^GPU')
fi
[[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || die "NUM_GPUS must be a positive integer, got '$NUM_GPUS'"
PYTHON=${PYTHON:-.venv/bin/python}
PORT=${PORT:-12355}
cd "$(dirname "$0")/.."

run() {  # prints (dry run) or runs one command, quoted so that the printed line can be pasted
  if [[ $DRY_RUN == 1 ]]; then quote "$@"; else "$@"; fi
}
quote() {  # shell words, single-quoted where needed
  local a out=()
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_@%+=:,./~-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

main=("$PYTHON" -m jaxspeech.main --config "$CONFIG" --workdir "$WORKDIR")
mesh=()
[[ " ${EXTRA[*]} " == *"--config.mesh.shape"* ]] || mesh=(--config.mesh.shape.data=-1)
if [[ $MODE == single ]]; then
  run env CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((NUM_GPUS - 1)))" \
    "${main[@]}" --distributed=off "${mesh[@]}" "${EXTRA[@]}"
  exit 0
fi

pids=()
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
[[ $DRY_RUN == 1 ]] || trap stop_all EXIT
for ((i = 0; i < NUM_GPUS; i++)); do
  cmd=(env CUDA_VISIBLE_DEVICES="$i" "${main[@]}" --coordinator_address "127.0.0.1:$PORT"
       --num_processes "$NUM_GPUS" --process_id "$i" "${mesh[@]}" "${EXTRA[@]}")
  if [[ $DRY_RUN == 1 ]]; then
    run "${cmd[@]}"
  else
    "${cmd[@]}" & pids+=($!)
  fi
done
[[ $DRY_RUN == 1 ]] && exit 0
status=0
for _ in "${pids[@]}"; do
  # The first process to end decides: on a failure the others are stopped (trap).
  wait -n "${pids[@]}" || { status=$?; echo "gpu.sh: a process failed (exit $status)" >&2; break; }
done
exit "$status"
