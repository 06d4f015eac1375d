"""Built-in tasks: known rows map to exact examples, the fixture files load, bad data gets a precise error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from softprompt.tasks.registry import TASKS, DataError, Example, get_task, load_examples, majority_rate, read_jsonl, resolve_data_dir

# One known row per task (the first row of each fixture train file) and the example it must become.
KNOWN = {
    "cb": (
        {"premise": "It was a complex language. Not written down but handed down. One might say it was peeled down.",
         "hypothesis": "the language was peeled down", "label": "entailment", "idx": 0},
        Example(
            "It was a complex language. Not written down but handed down. One might say it was peeled down.\n"
            "Question: the language was peeled down. True, False, or Neither?\nAnswer:",
            (" True", " False", " Neither"),
            0,  # label 0 = entailment
        ),
    ),
    "rte": (
        {"premise": "No Weapons of Mass Destruction Found in Iraq Yet.",
         "hypothesis": "Weapons of Mass Destruction Found in Iraq.", "label": "not_entailment", "idx": 0},
        Example(
            "No Weapons of Mass Destruction Found in Iraq Yet.\n"
            "Question: Weapons of Mass Destruction Found in Iraq. True or False?\nAnswer:",
            (" True", " False"),
            1,  # label 1 = not_entailment
        ),
    ),
    "copa": (
        {"premise": "The man hated his new haircut.", "choice1": "He wore a hat.", "choice2": "He grew a beard.",
         "question": "effect", "label": 0, "idx": 31},
        Example("The man hated his new haircut therefore", (" he wore a hat.", " he grew a beard."), 0),
    ),
    "wsc": (
        {"text": "Billy cried because Toby wouldn't share his toy.",
         "target": {"span2_index": 6, "span1_index": 3, "span1_text": "Toby", "span2_text": "his"},
         "idx": 9, "label": True},
        Example(
            "Billy cried because Toby wouldn't share his toy.\n"
            'Question: In the passage above, does the pronoun "*his*" refer to "*Toby*"?\nAnswer:',
            (" no", " yes"),
            1,  # label True = 1
        ),
    ),
    "wic": (
        {"word": "curd", "sentence1": "Bean curd.", "sentence2": "Lemon curd.", "idx": 239, "label": True,
         "start1": 5, "start2": 6, "end1": 9, "end2": 10, "version": 1.1},
        Example(
            "Sentence 1: Bean curd.\nSentence 2: Lemon curd.\n"
            "Question: Is the word 'curd' used in the same way in the two sentences above?\nAnswer:",
            (" no", " yes"),
            1,  # label True = 1
        ),
    ),
    "boolq": (
        {"question": "are they going to make a punisher season 2",
         "passage": "The Punisher (season 2) -- The season is set for release in 2019.", "idx": 2644, "label": True},
        Example(
            "The Punisher (season 2) -- The season is set for release in 2019.\n"
            "Question: are they going to make a punisher season 2?\nAnswer:",
            (" no", " yes"),
            1,  # label True = 1
        ),
    ),
}
ROW_TASKS = list(KNOWN)  # multirc's rows are paragraphs: tests/test_taskfiles.py checks its expansion
FIXTURE_TASKS = ["cb", "rte", "copa", "wsc"]

# Every raw label value and the index it must map to (the comments in the task files).
LABEL_ORDER = {
    "cb": {"entailment": 0, "contradiction": 1, "neutral": 2},
    "rte": {"entailment": 0, "not_entailment": 1},
    "copa": {0: 0, 1: 1},
    "wsc": {False: 0, True: 1},
    "wic": {False: 0, True: 1},
    "boolq": {False: 0, True: 1},
}
FIXTURE_COUNTS = {"cb": (24, 6), "rte": (24, 8), "copa": (24, 8), "wsc": (24, 8)}


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", ROW_TASKS, ids=ROW_TASKS)
def test_known_row_becomes_exact_example(name):
    row, expected = KNOWN[name]
    assert TASKS[name].to_example(row) == expected


@pytest.mark.parametrize("name", ROW_TASKS, ids=ROW_TASKS)
def test_label_mapping(name):
    row, _ = KNOWN[name]
    task = TASKS[name]
    for raw, index in LABEL_ORDER[name].items():
        assert task.to_example({**row, "label": raw}).label == index
    assert [LABEL_ORDER[name][raw] for raw in task.labels] == list(range(len(task.labels)))


@pytest.mark.parametrize("name", ROW_TASKS, ids=ROW_TASKS)
def test_choices_have_a_leading_space(name):
    example = KNOWN[name][1]
    assert all(c.startswith(" ") and not c.startswith("  ") for c in example.choices)
    assert all(w.startswith(" ") for w in TASKS[name].label_words)


@pytest.mark.parametrize("name", ["cb", "rte", "wsc", "wic", "boolq"], ids=["cb", "rte", "wsc", "wic", "boolq"])
def test_verbalizers_are_single_tokens(name, tokenizer):
    choices = KNOWN[name][1].choices
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    assert all(len(i) == 1 for i in ids), ids
    assert len({i[0] for i in ids}) == len(choices)  # distinct tokens, or rank classification is a coin flip


@pytest.mark.parametrize("name", FIXTURE_TASKS, ids=FIXTURE_TASKS)
def test_fixture_files_load(name, data_dir):
    task = TASKS[name]
    train, val = load_examples(task, "train", data_dir), load_examples(task, "val", data_dir)
    assert (len(train), len(val)) == FIXTURE_COUNTS[name]
    assert train[0] == KNOWN[name][1]
    for examples in (train, val):
        assert {e.label for e in examples} == set(range(len(task.labels)))  # every label present
        assert all(len(e.choices) == len(task.labels) and e.text for e in examples)


def test_data_dir_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_DATA_DIR", str(data_dir))
    assert resolve_data_dir() == data_dir
    assert len(load_examples(TASKS["cb"], "train")) == 24


def test_missing_data_folder_says_where_it_looked_and_how_to_get_data(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=r"looked in: .*nowhere.*super\.gluebenchmark\.com.*--data-dir"):
        load_examples(TASKS["cb"], "train", missing)


def test_missing_split_file_is_named(tmp_path):
    (tmp_path / "CB").mkdir()
    with pytest.raises(DataError, match=r"data file not found: .*CB/val\.jsonl"):
        load_examples(TASKS["cb"], "val", tmp_path)


def test_test_split_is_refused(data_dir):
    with pytest.raises(DataError, match="test split has no labels"):
        load_examples(TASKS["cb"], "test", data_dir)


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "CB" / "train.jsonl"
    row = KNOWN["cb"][0]
    path.parent.mkdir()
    path.write_text(json.dumps(row) + "\n\n" + json.dumps(row) + "\n" + '{"premise": "cut off' + "\n")
    with pytest.raises(DataError, match=r"CB/train\.jsonl:4: not valid JSON"):
        load_examples(TASKS["cb"], "train", tmp_path)


def test_non_object_line_is_named(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"a": 1}, [1, 2]])
    with pytest.raises(DataError, match=r"x\.jsonl:2: expected a JSON object, got array"):
        read_jsonl(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="has no examples"):
        read_jsonl(path)


# A label of the right JSON type that is not one of the task's labels, and the message it gets.
# WSC's labels are both booleans, so any other value is a type error.
BAD_LABELS = {
    "cb": ("maybe", r"unknown label 'maybe' for task cb; expected one of \['entailment'"),
    "rte": ("maybe", r"unknown label 'maybe' for task rte; expected one of \['entailment'"),
    "copa": (2, r"unknown label 2 for task copa; expected one of \[0, 1\]"),
    "wsc": ("maybe", r"field 'label' must be a JSON boolean, got string 'maybe'"),
}


@pytest.mark.parametrize("name", FIXTURE_TASKS, ids=FIXTURE_TASKS)
def test_unknown_label_names_file_line_and_valid_labels(name, tmp_path):
    task = TASKS[name]
    row = KNOWN[name][0]
    label, message = BAD_LABELS[name]
    write_jsonl(tmp_path / task.folder / "train.jsonl", [row, {**row, "label": label}])
    with pytest.raises(DataError, match=rf"train\.jsonl:2: {message}"):
        load_examples(task, "train", tmp_path)


def test_label_type_must_match():
    """A string "1" is not COPA's int label 1, and the int 1 is not WSC's True (`render`: no field check first)."""
    with pytest.raises(DataError, match=r"unknown label '1' for task copa"):
        TASKS["copa"].render({**KNOWN["copa"][0], "label": "1"})
    with pytest.raises(DataError, match=r"unknown label 1 for task wsc"):
        TASKS["wsc"].render({**KNOWN["wsc"][0], "label": 1})
    with pytest.raises(DataError, match=r"field 'label' must be a JSON integer, got string '1'"):
        TASKS["copa"].to_example({**KNOWN["copa"][0], "label": "1"})


@pytest.mark.parametrize("name", FIXTURE_TASKS, ids=FIXTURE_TASKS)
def test_missing_field_is_named(name, tmp_path):
    task = TASKS[name]
    row = dict(KNOWN[name][0])
    dropped = next(iter(task.fields))
    del row[dropped]
    write_jsonl(tmp_path / task.folder / "val.jsonl", [KNOWN[name][0], KNOWN[name][0], row])
    with pytest.raises(DataError, match=rf"val\.jsonl:3: missing field '{dropped}'"):
        load_examples(task, "val", tmp_path)


def test_malformed_nested_field(tmp_path):
    row = {**KNOWN["wsc"][0], "target": {"span1_text": "Toby"}}
    write_jsonl(tmp_path / "WSC" / "train.jsonl", [row])
    with pytest.raises(DataError, match=r"train\.jsonl:1: missing field 'target\.span2_text'"):
        load_examples(TASKS["wsc"], "train", tmp_path)


def test_unknown_copa_question():
    with pytest.raises(DataError, match=r"unknown COPA question 'why'; expected one of \['cause', 'effect'\]"):
        TASKS["copa"].to_example({**KNOWN["copa"][0], "question": "why"})


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="unknown task 'record'; choose one of: cb, rte, copa, wsc, wic, multirc, boolq, or give the path"):
        get_task("record")


def test_task_names_are_case_insensitive():
    assert get_task("CB") is TASKS["cb"]


def test_majority_rate_is_the_most_common_labels_share():
    assert majority_rate([0, 1, 1, 2]) == 50.0 and majority_rate([1, 1, 1, 0]) == 75.0 and majority_rate([2]) == 100.0
    with pytest.raises(ValueError, match="at least one label; the split is empty"):
        majority_rate([])
