"""SuperGLUE tasks as data plus pure functions.

Each task maps one row of the official JSONL release to an `Example`: the context text (ending
where the answer starts), the verbalized choices in label order (leading space included) and the
index of the right one. Templates follow lm-evaluation-harness's `super_glue` tasks. Adding a task
is one new entry in `TASKS`; the training and evaluation code never branch on a task's name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Task:
    name: str
    folder: str  # folder name in the official release
    to_example: Callable[[dict], Example]
    labels: tuple  # raw label values in label order: index i <-> choices[i]
    init_text: str  # the paper's hand-written "good prompt"
    fields: dict[str, type] = field(hash=False)  # fields every labelled row must have, and their JSON types
    label_words: tuple[str, ...]  # tokens for the class-label init (the verbalizers)

    def label_index(self, row: dict) -> int:
        """Index of `row["label"]` in this task's label order.

        Raises:
            DataError: the label is not one of the task's labels.
        """
        label = row["label"]
        for i, known in enumerate(self.labels):
            if type(label) is type(known) and label == known:
                return i
        raise DataError(f"unknown label {short(label)} for task {self.name}; expected one of {list(self.labels)}")


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


# label 0 = entailment, 1 = contradiction, 2 = neutral
CB_CHOICES = (" True", " False", " Neither")


def cb_example(row: dict) -> Example:
    text = f"{row['premise']}\nQuestion: {row['hypothesis']}. True, False, or Neither?\nAnswer:"
    return Example(text, CB_CHOICES, TASKS["cb"].label_index(row))


# label 0 = entailment, 1 = not_entailment
RTE_CHOICES = (" True", " False")


def rte_example(row: dict) -> Example:
    text = f"{row['premise']}\nQuestion: {row['hypothesis']} True or False?\nAnswer:"
    return Example(text, RTE_CHOICES, TASKS["rte"].label_index(row))


# label 0 = choice1, 1 = choice2; the choice continues the premise after "because"/"therefore"
COPA_CONNECTORS = {"cause": "because", "effect": "therefore"}


def _copa_choice(choice: str) -> str:
    return " " + choice[0].lower() + choice[1:]


def copa_example(row: dict) -> Example:
    question = row["question"]
    if question not in COPA_CONNECTORS:
        raise DataError(f"unknown COPA question {short(question)}; expected one of {sorted(COPA_CONNECTORS)}")
    for name in ("choice1", "choice2"):
        if not row[name].strip():
            raise DataError(f"field {name!r} is empty; a COPA choice needs text")
    text = f"{row['premise'].strip().rstrip('.')} {COPA_CONNECTORS[question]}"
    choices = (_copa_choice(row["choice1"]), _copa_choice(row["choice2"]))
    return Example(text, choices, TASKS["copa"].label_index(row))


# label False = 0 (" no"), True = 1 (" yes")
WSC_CHOICES = (" no", " yes")


def wsc_example(row: dict) -> Example:
    target = row["target"]
    for name in ("span1_text", "span2_text"):
        require(target, name, str, where="target.")
    text = (
        f"{row['text']}\nQuestion: In the passage above, does the pronoun \"*{target['span2_text']}*\" "
        f"refer to \"*{target['span1_text']}*\"?\nAnswer:"
    )
    return Example(text, WSC_CHOICES, TASKS["wsc"].label_index(row))


TASKS: dict[str, Task] = {
    "cb": Task(
        name="cb",
        folder="CB",
        to_example=cb_example,
        labels=("entailment", "contradiction", "neutral"),
        init_text="Does the hypothesis entail, contradict or is neutral about the premise?",
        fields={"premise": str, "hypothesis": str, "label": str},
        label_words=CB_CHOICES,
    ),
    "rte": Task(
        name="rte",
        folder="RTE",
        to_example=rte_example,
        labels=("entailment", "not_entailment"),
        init_text="Does the hypothesis entail, or not entail the premise?",
        fields={"premise": str, "hypothesis": str, "label": str},
        label_words=RTE_CHOICES,
    ),
    "copa": Task(
        name="copa",
        folder="COPA",
        to_example=copa_example,
        labels=(0, 1),
        init_text="Pick the correct choice given the premise and the question.",
        fields={"premise": str, "choice1": str, "choice2": str, "question": str, "label": int},
        label_words=tuple(f" {w}" for w in COPA_CONNECTORS.values()),  # COPA's answers vary per example
    ),
    "wsc": Task(
        name="wsc",
        folder="WSC",
        to_example=wsc_example,
        labels=(False, True),
        init_text=(
            "Given the following text, decide whether the span1_text is referenced by the pronoun in span2_text"
        ),
        fields={"text": str, "target": dict, "label": bool},
        label_words=WSC_CHOICES,
    ),
}


def get_task(name: str) -> Task:
    """The task called `name` (case-insensitive).

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    task = TASKS.get(name.lower())
    if task is None:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return task


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


def load_examples(task: Task, split: str, data_dir: str | Path | None = None) -> list[Example]:
    """All examples of one split (`train` or `val`; `test` has no labels).

    Raises:
        DataError: missing folder or file, malformed line, missing field, field of the wrong type
            or unknown label (file and line named).
    """
    if split == "test":
        raise DataError("the SuperGLUE test split has no labels; use 'train' or 'val'")
    path = resolve_data_dir(data_dir) / task.folder / f"{split}.jsonl"
    examples = []
    for lineno, row in read_jsonl(path):
        try:
            for name, expected in task.fields.items():
                require(row, name, expected)
            examples.append(task.to_example(row))
        except DataError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        except (TypeError, KeyError, AttributeError, IndexError, ValueError) as e:
            raise DataError(f"{path}:{lineno}: malformed {task.name} row ({type(e).__name__}: {short(str(e))})") from None
    return examples
