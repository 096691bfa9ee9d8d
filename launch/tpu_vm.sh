#!/usr/bin/env bash
# Train on a Cloud TPU VM (one host or a multi-host pod slice): create it (directly or as a queued
# resource), copy or clone this code to every worker, install, run the same
# `python -m jaxspeech.main` on --worker=all (jax.distributed finds its peers from the TPU
# metadata), follow worker 0's log, and delete the TPU when done (KEEP=1 keeps it).
#
#   TPU_NAME=js-v5e-16 ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-16 \
#   CONFIG=experiments/hubert.py:paper WORKDIR=gs://my-bucket/hubert_base \
#     launch/tpu_vm.sh [--dry-run] [-- --config.data.manifest=/data/ls960.jsonl ...]
#
# Required: TPU_NAME ZONE ACCELERATOR_TYPE CONFIG WORKDIR (shared by all hosts: a gs:// path).
# Optional: PROJECT, RUNTIME_VERSION (default v2-alpha-tpuv5-lite), QUEUED=1 (queued resource),
#   SPOT=1, REPO_URL + BRANCH (git clone on the workers; default: copy `git archive HEAD`),
#   KEEP=1 (do not delete the TPU at the end), REMOTE_DIR (default jaxspeech).
# Everything after `--` is passed to jaxspeech.main. --dry-run prints each command instead.
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

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
for v in TPU_NAME ZONE ACCELERATOR_TYPE CONFIG WORKDIR; do
  [[ -n "${!v:-}" ]] || missing+=("$v")
done
[[ ${#missing[@]} -eq 0 ]] || die "set ${missing[*]} (see --help); e.g. TPU_NAME=js-v5e-16 \
ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-16 CONFIG=experiments/hubert.py:paper \
WORKDIR=gs://bucket/run"
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
REMOTE_DIR=${REMOTE_DIR:-jaxspeech}
QUEUED=${QUEUED:-0}
KEEP=${KEEP:-0}

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

GC=(gcloud)
[[ -n "${PROJECT:-}" ]] && GC+=(--project "$PROJECT")
SSH=("${GC[@]}" compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE")

# 1. Create the TPU VM (all its hosts).
if [[ $QUEUED == 1 ]]; then
  create=("${GC[@]}" compute tpus queued-resources create "$TPU_NAME" --node-id "$TPU_NAME"
          --zone "$ZONE" --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$RUNTIME_VERSION")
  [[ "${SPOT:-0}" == 1 ]] && create+=(--spot)
  run "${create[@]}"
  state=("${GC[@]}" compute tpus queued-resources describe "$TPU_NAME" --zone "$ZONE"
         --format 'value(state.state)')
  if [[ $DRY_RUN == 1 ]]; then
    echo "# wait until this prints ACTIVE:"; run "${state[@]}"
  else
    until [[ "$("${state[@]}")" == ACTIVE ]]; do echo "waiting for $TPU_NAME..."; sleep 30; done
  fi
  delete=("${GC[@]}" compute tpus queued-resources delete "$TPU_NAME" --zone "$ZONE" --force
          --quiet)
else
  create=("${GC[@]}" compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE"
          --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION")
  [[ "${SPOT:-0}" == 1 ]] && create+=(--spot)
  run "${create[@]}"
  delete=("${GC[@]}" compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet)
fi

cleanup() {
  if [[ $KEEP == 1 ]]; then
    echo "KEEP=1: $TPU_NAME is still running; delete it with:"; DRY_RUN=1 run "${delete[@]}"
  else
    run "${delete[@]}"
  fi
}
[[ $DRY_RUN == 1 ]] || trap cleanup EXIT

# 2. The code on every worker.
if [[ -n "${REPO_URL:-}" ]]; then
  run "${SSH[@]}" --worker=all --command \
    "rm -rf $REMOTE_DIR && git clone --depth 1 --branch ${BRANCH:-main} $REPO_URL $REMOTE_DIR"
else
  tarball=/tmp/jaxspeech-$TPU_NAME.tar.gz
  run git -C "$(cd "$(dirname "$0")/.." && pwd)" archive --format=tar.gz -o "$tarball" HEAD
  run "${GC[@]}" compute tpus tpu-vm scp "$tarball" "$TPU_NAME:~/jaxspeech.tar.gz" --zone "$ZONE" \
    --worker=all
  run "${SSH[@]}" --worker=all --command \
    "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/jaxspeech.tar.gz -C $REMOTE_DIR"
fi

# 3. Install: the pinned stack with JAX's TPU runtime.
run "${SSH[@]}" --worker=all --command \
  "cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt \
'jax[tpu]==0.10.2' && .venv/bin/pip install -q --no-deps -e ."

# 4. Train: the same command on every worker, detached (survives a dropped ssh); exit code kept.
main_args=(--config "$CONFIG" --workdir "$WORKDIR" "${EXTRA[@]}")
inner="cd $REMOTE_DIR && .venv/bin/python -m jaxspeech.main $(quote "${main_args[@]}"); \
echo \$? > ~/train.rc"
train="rm -f ~/train.rc && nohup bash -c $(quote "$inner") > ~/train.log 2>&1 &"
run "${SSH[@]}" --worker=all --command "$train"

# 5. Follow worker 0's log (process 0 does the logging) until the run ends; all exit codes.
run "${SSH[@]}" --worker=0 --command \
  'tail -n +1 -F ~/train.log & t=$!; until [ -f ~/train.rc ]; do sleep 15; done; kill $t'
run "${SSH[@]}" --worker=all --command 'echo "$(hostname): exit $(cat ~/train.rc)"'
# 6. Delete (on exit, also after a failure) unless KEEP=1.
[[ $DRY_RUN == 1 ]] && cleanup
exit 0
