"""Bad data on purpose: every malformed line gives one DataError naming file and line, nothing else.

Property-based (hypothesis): a file of real fixture rows with one line corrupted (random bytes,
truncation, a field of the wrong type, an unknown label, a missing field) must raise a `DataError`
whose message names that file and that line; never another exception type, never a silent skip
(blank lines are the only lines skipped).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import softprompt.tasks.data as tasks_module
from softprompt.tasks.registry import TASKS, DataError, Task, load_examples, read_jsonl

from conftest import FIXTURE_DATA

TASK_NAMES = ["cb", "rte", "copa", "wsc"]  # the four with fixture files
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def fixture_rows(task: Task, n: int = 3) -> list[dict]:
    lines = (FIXTURE_DATA / task.folder / "train.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def write_split(folder: Path, task: Task, lines: list[bytes]) -> Path:
    path = folder / task.folder / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def field_paths(task: Task) -> list[tuple[str, ...]]:
    """Every required field, nested ones (WSC's target.span1_text) as paths."""
    return [tuple(name.split(".")) for name in task.fields]


def expected_type(task: Task, path: tuple[str, ...]) -> type:
    return task.fields[".".join(path)]


def set_path(row: dict, path: tuple[str, ...], value=None, delete: bool = False) -> dict:
    row = json.loads(json.dumps(row))
    parent = row
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return row


@st.composite
def bad_line(draw, task: Task) -> tuple[bytes, bool]:
    """(a corrupted line, whether it must fail): only random bytes may turn out blank (skipped)."""
    row = draw(st.sampled_from(fixture_rows(task)))
    kind = draw(st.sampled_from(["bytes", "truncated", "wrong_type", "unknown_label", "missing"]))
    if kind == "bytes":
        return draw(st.binary(max_size=120)).replace(b"\n", b" "), False
    if kind == "truncated":
        line = json.dumps(row).encode()
        return line[: draw(st.integers(1, len(line) - 1))], True
    if kind == "missing":
        return json.dumps(set_path(row, draw(st.sampled_from(field_paths(task))), delete=True)).encode(), True
    if kind == "wrong_type":
        path = draw(st.sampled_from(field_paths(task)))
        value = draw(JSON_VALUES.filter(lambda v: type(v) is not expected_type(task, path)))
        return json.dumps(set_path(row, path, value)).encode(), True
    label = draw(JSON_VALUES.filter(lambda v: not any(type(v) is type(k) and v == k for k in task.labels)))
    return json.dumps({**row, "label": label}).encode(), True


@pytest.mark.parametrize("task_name", TASK_NAMES, ids=TASK_NAMES)
@SETTINGS
@given(data=st.data())
def test_a_bad_line_raises_one_data_error_naming_file_and_line(task_name, data, tmp_path_factory):
    task = TASKS[task_name]
    good = [json.dumps(row).encode() for row in fixture_rows(task)]
    bad, must_fail = data.draw(bad_line(task))
    position = data.draw(st.integers(0, len(good)))
    blanks = data.draw(st.integers(0, 2))
    lines = [b""] * blanks + good[:position] + [bad] + good[position:]  # blank lines shift the numbering
    folder = tmp_path_factory.mktemp("data")
    path = write_split(folder, task, lines)
    bad_lineno = blanks + position + 1
    try:
        examples = load_examples(task, "train", folder)
    except DataError as e:
        message = str(e)
        assert message.startswith(f"{path}:{bad_lineno}: "), message
        assert message.count(str(path)) == 1
        return
    assert not must_fail, f"line {bad_lineno} ({bad[:80]!r}) was accepted"
    assert not bad.strip(), f"line {bad_lineno} ({bad[:80]!r}) was accepted"  # only a blank line may be skipped
    assert len(examples) == len(good)


@SETTINGS
@given(content=st.binary(max_size=400))
def test_random_bytes_never_raise_anything_but_data_error(content, tmp_path_factory):
    path = tmp_path_factory.mktemp("bytes") / "train.jsonl"
    path.write_bytes(content)
    try:
        rows = read_jsonl(path)
    except DataError as e:
        match = re.match(rf"{re.escape(str(path))}(?::(\d+))?: ", str(e))
        assert match, str(e)
        if match.group(1):  # the named line really is not a JSON object
            line = content.split(b"\n")[int(match.group(1)) - 1]
            try:
                assert not isinstance(json.loads(line.decode("utf-8-sig")), dict)
            except (ValueError, RecursionError):
                pass
        return
    nonblank = [line for line in content.split(b"\n") if line.strip()]
    assert len(rows) == len(nonblank)  # nothing skipped but blank lines


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["empty", "blank-lines"])
def test_a_file_without_rows_is_refused(tmp_path, content):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: the file has no examples"):
        read_jsonl(path)


def test_missing_file_and_a_folder_named_like_one(tmp_path):
    with pytest.raises(DataError, match=rf"data file not found: {re.escape(str(tmp_path / 'nope.jsonl'))}"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match="data file not found"):
        read_jsonl(tmp_path / "dir.jsonl")


def test_huge_line_over_the_limit_is_refused_and_under_it_accepted(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks_module, "MAX_LINE_BYTES", 10_000)
    task = TASKS["rte"]
    row = fixture_rows(task, 1)[0]
    long_ok = json.dumps({**row, "premise": "word " * 1_500}).encode()  # ~7.5 KB
    too_long = json.dumps({**row, "premise": "word " * 3_000}).encode()  # ~15 KB
    path = write_split(tmp_path, task, [long_ok, too_long, long_ok])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: line longer than 10000 bytes"):
        load_examples(task, "train", tmp_path)
    write_split(tmp_path, task, [long_ok])
    assert len(load_examples(task, "train", tmp_path)) == 1


@pytest.mark.parametrize(
    "line, message",
    [
        (b"[" * 100_000, "not valid JSON"),  # deeper than the parser's recursion limit
        (b'{"label": ' + b"1" * 5000 + b"}", "not valid JSON"),  # more digits than int() allows
        (b"\xff\xfe{}", "not UTF-8 text"),
        (b"NaN", "expected a JSON object, got number"),
        (b'"text"', "expected a JSON object, got string"),
        (b"null", "expected a JSON object, got null"),
    ],
    ids=["deep-nesting", "huge-integer", "not-utf8", "nan", "string", "null"],
)
def test_lines_that_break_the_json_parser(tmp_path, line, message):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n" + line + b"\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: {message}"):
        read_jsonl(path)


def test_a_byte_order_mark_on_the_first_line_is_accepted(tmp_path):
    task = TASKS["cb"]
    path = write_split(tmp_path, task, [json.dumps(row).encode() for row in fixture_rows(task)])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(load_examples(task, "train", tmp_path)) == 3


@pytest.mark.parametrize(
    "task_name, change, message",
    [
        ("cb", {"premise": 5}, "field 'premise' must be a JSON string, got integer 5"),
        ("rte", {"hypothesis": None}, "field 'hypothesis' must be a JSON string, got null"),
        ("cb", {"label": 0}, "field 'label' must be a JSON string, got integer 0"),
        ("cb", {"label": "maybe"}, "unknown label 'maybe' for task cb"),
        ("copa", {"label": True}, "field 'label' must be a JSON integer, got boolean True"),
        ("copa", {"label": 2}, r"unknown label 2 for task copa; expected one of \[0, 1\]"),
        ("copa", {"question": "why"}, "unknown COPA question 'why'"),
        ("copa", {"choice2": "  "}, "field 'choice2' is empty"),
        ("wsc", {"label": "true"}, "field 'label' must be a JSON boolean, got string 'true'"),
        ("wsc", {"target": "Toby"}, "field 'target' must be a JSON object, got string 'Toby'"),
        ("wsc", {"target": {"span2_text": "his"}}, "missing field 'target.span1_text'"),
        ("wsc", {"target": {"span1_text": ["Toby"], "span2_text": "his"}}, "field 'target.span1_text' must be a JSON string, got array"),
        ("rte", {"premise": "\ud800"}, "field 'premise' is not valid Unicode"),
        ("rte", {"label": "x" * 10_000}, r"unknown label 'xxx.*\.\.\. \(10002 characters\)"),
    ],
    ids=["cb-int-text", "rte-null-text", "cb-int-label", "cb-unknown-label", "copa-bool-label", "copa-label-2",
         "copa-question", "copa-empty-choice", "wsc-string-label", "wsc-string-target", "wsc-missing-span",
         "wsc-list-span", "lone-surrogate", "huge-label"],
)
def test_field_errors_name_the_field_file_and_line(tmp_path, task_name, change, message):
    task = TASKS[task_name]
    rows = fixture_rows(task)
    rows[1] = {**rows[1], **change}
    path = write_split(tmp_path, task, [json.dumps(row).encode() for row in rows])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: {message}"):
        load_examples(task, "train", tmp_path)


@pytest.mark.parametrize("task_name", TASK_NAMES, ids=TASK_NAMES)
def test_extra_fields_are_ignored(tmp_path, task_name):
    task = TASKS[task_name]
    rows = [{**row, "note": [1, 2]} for row in fixture_rows(task)]
    write_split(tmp_path, task, [json.dumps(row).encode() for row in rows])
    assert len(load_examples(task, "train", tmp_path)) == 3
