"""Rows and examples: the `Example` every task produces, the strict JSONL reader, the data folder.

A task (a task file, see `taskfile`) maps each data row to an `Example`: the context text (ending
where the answer starts), the choices in label order (their delimiter, usually a space, in front)
and the index of the right one. The JSONL reader names the file and line of every bad row.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "SOFTPROMPT_DATA_DIR"
DEFAULT_DATA_DIR = Path("data/superglue")
MAX_LINE_BYTES = 1 << 24  # 16 MiB; the longest SuperGLUE row is a few KB


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line) and the fix."""


@dataclass(frozen=True)
class Example:
    text: str
    choices: tuple[str, ...]
    label: int
    group: str | None = None  # examples scored together (MultiRC: the answers of one question), for EM per group


def short(value: object, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters: error messages stay readable for huge values."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def require(row: dict, name: str, expected: type, where: str = "") -> object:
    """`row[name]`, checked to be of JSON type `expected` (exactly: a bool is not an int here).

    Raises:
        DataError: missing field, wrong type, or a string that is not valid Unicode (field named).
    """
    if name not in row:
        raise DataError(f"missing field {where + name!r}")
    value = row[name]
    if type(value) is not expected:
        raise DataError(f"field {where + name!r} must be a JSON {JSON_TYPES[expected]}, got {JSON_TYPES.get(type(value), type(value).__name__)} {short(value)}")
    if expected is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"field {where + name!r} is not valid Unicode (a lone surrogate escape such as \\ud800)") from None
    return value


JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array", type(None): "null"}


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The SuperGLUE folder: the argument, else $SOFTPROMPT_DATA_DIR, else ./data/superglue.

    Raises:
        DataError: the folder does not exist; the message says where it looked and how to get the data.
    """
    candidates = [Path(data_dir)] if data_dir else []
    if not candidates and os.environ.get(DATA_DIR_ENV):
        candidates.append(Path(os.environ[DATA_DIR_ENV]))
    if not candidates:
        candidates.append(DEFAULT_DATA_DIR)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise DataError(
        f"SuperGLUE data folder not found (looked in: {', '.join(str(c.resolve()) for c in candidates)}). "
        f"Download the official SuperGLUE release (https://super.gluebenchmark.com/tasks), unzip it so that "
        f"CB/train.jsonl etc. sit in one folder, and pass it with --data-dir or ${DATA_DIR_ENV}."
    )


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for each non-blank line of a JSONL file.

    Raises:
        DataError: the file is missing, unreadable or empty, or a line is not a JSON object or is
            longer than `MAX_LINE_BYTES` (file and line named).
    """
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    rows = []
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
                if len(raw) > MAX_LINE_BYTES:
                    raise DataError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES} bytes; is this a JSONL file?")
                if raw.strip():
                    rows.append((lineno, _parse_line(path, lineno, raw)))
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if not rows:
        raise DataError(f"{path}: the file has no examples")
    return rows


def _parse_line(path: Path, lineno: int, raw: bytes) -> dict:
    try:
        row = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start}); fix or remove this line") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, too many digits, nesting too deep
        raise DataError(f"{path}:{lineno}: not valid JSON ({short(str(e), 200)}); fix or remove this line") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {JSON_TYPES.get(type(row), type(row).__name__)}")
    return row
