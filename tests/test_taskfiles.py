"""Task files: the built-ins give the Python tasks' exact examples and scores; any lm-eval YAML over
local files trains and evaluates; MultiRC's expansion and metrics; every bad input is one clear error."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from softprompt.cli import app
from softprompt.data.batch import encode
from softprompt.eval.scoring import score
from softprompt.eval.task_metrics import grouped_metrics
from softprompt.io.runs import load_prompt
from softprompt.tasks.registry import TASKS, DataError, Example, get_task, load_examples
from softprompt.tasks.taskfile import TaskFileError, load_task_file
from softprompt.train.config import TrainConfig, load_train_task
from softprompt.train.loop import train

from conftest import FIXTURE_DATA, SHARED_DATA

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
# Recorded from the Python tasks (tasks.py before the port to task files) on the fixture rows, with
# tests/conftest.py's tiny random Llama (seed 0), no prompt, max_length 256.
PINNED = json.loads((Path(__file__).parent / "fixtures" / "builtin_examples.json").read_text())
FOUR = ["cb", "rte", "copa", "wsc"]

# The first rows of the COPA fixture, as a task file over local JSON written for lm-eval would see them.
COPA_YAML = """\
task: my_copa
dataset_path: json
dataset_kwargs:
  data_files:
    train: data/train.jsonl
    validation: data/val.jsonl
output_type: multiple_choice
training_split: train
validation_split: validation
doc_to_text: "{{ premise.strip()[:-1] }} {{ {'cause': 'because', 'effect': 'therefore'}[question] }}"
doc_to_choice: !function rows.choices
doc_to_target: label
metric_list:
  - metric: acc
"""
ROWS_PY = """\
def choices(doc):
    return [doc["choice1"][0].lower() + doc["choice1"][1:], doc["choice2"][0].lower() + doc["choice2"][1:]]

def broken(doc):
    return doc["no such field"]
"""


def write_task(folder: Path, yaml_text: str = COPA_YAML, rows_py: str = ROWS_PY, n: int = 24) -> Path:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        lines = (FIXTURE_DATA / "COPA" / f"{split}.jsonl").read_text().splitlines()[:n]
        (folder / "data" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "rows.py").write_text(rows_py)
    path = folder / "task.yaml"
    path.write_text(yaml_text)
    return path


@pytest.mark.parametrize("name", FOUR, ids=FOUR)
def test_builtin_files_give_the_python_tasks_examples_and_log_likelihoods(name, tiny_backbone):
    for split in ("train", "val"):
        pinned = PINNED[f"{name}/{split}"]
        examples = load_examples(TASKS[name], split, FIXTURE_DATA)
        assert examples == [Example(p["text"], tuple(p["choices"]), p["label"]) for p in pinned]
        items = [encode(tiny_backbone.tokenizer, e, 256) for e in examples]
        scores = score(tiny_backbone, None, items, 8)
        for i, p in enumerate(pinned):
            assert scores.logprobs[0, i, : len(p["choices"])].tolist() == pytest.approx(p["logprobs"], abs=2e-4)
        assert scores.predictions()[0].tolist() == [p["prediction"] for p in pinned]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data/superglue")
def test_the_lm_eval_copa_example_gives_the_builtin_copa_examples():
    task = get_task(str(EXAMPLES_DIR / "copa.yaml"))
    for split in ("train", "val"):
        assert load_examples(task, split) == load_examples(TASKS["copa"], split, SHARED_DATA)


def test_the_lm_eval_copa_example_on_fixture_rows(tmp_path):
    """examples/copa.yaml, its data paths pointed at the fixture: the built-in COPA's examples."""
    text = (EXAMPLES_DIR / "copa.yaml").read_text().replace("../../shared/data/superglue", str(FIXTURE_DATA))
    shutil.copy(EXAMPLES_DIR / "copa.py", tmp_path / "copa.py")
    (tmp_path / "copa.yaml").write_text(text)
    task = get_task(str(tmp_path / "copa.yaml"))
    assert load_examples(task, "val") == load_examples(TASKS["copa"], "val", FIXTURE_DATA)


def test_a_yaml_task_over_fixture_rows_trains_and_evaluates(tiny_backbone, tmp_path):
    path = write_task(tmp_path / "task")
    task = get_task(str(path))
    examples = load_examples(task, "val")
    assert examples == load_examples(TASKS["copa"], "val", FIXTURE_DATA)  # Jinja2 + !function = the built-in
    assert "no init_text" in task.notes[0] and task.label_words == tuple(" " + w for w in task.init_text.split())
    config = TrainConfig(task=str(path), num_tokens=4, lr=0.3, epochs=1, min_dev_examples=6, batch_size=8, device="cpu")
    record = train(config, tmp_path / "run", backbone=tiny_backbone, progress=False)
    assert record["status"] == "done" and record["task"] == "my_copa" and record["steps"] == 3
    # the record's val numbers are what `softprompt evaluate` reports from the files: the saved prompt, the model reloaded
    tiny_backbone.model.save_pretrained(tmp_path / "model")
    tiny_backbone.tokenizer.save_pretrained(tmp_path / "model")
    args = ["evaluate", "--task", str(path), "--prompt", str(tmp_path / "run"), "--model", str(tmp_path / "model"), "--device", "cpu",
            "--batch-size", str(config.eval_batch_size), "--out", str(tmp_path / "val.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    evaluated = json.loads((tmp_path / "val.json").read_text())
    assert record["val"]["n"] == evaluated["n"] == 8
    assert {k: record["val"][k] for k in ("accuracy", "exact_match", "macro_f1")} == {k: evaluated[k] for k in ("accuracy", "exact_match", "macro_f1")}
    assert record["data"]["task_file"] == str(path.resolve()) and len(record["data"]["train_sha256"]) == 64
    assert record["task_notes"] == list(task.notes)
    assert load_prompt(tmp_path / "run")[0].shape == (4, tiny_backbone.hidden_size)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_csv_and_parquet_files(tmp_path, kind):
    import datasets

    rows = [{"question": "2+2?", "a": "four", "b": "five", "answer": 0}, {"question": "Sky?", "a": "green", "b": "blue", "answer": 1}]
    getattr(datasets.Dataset.from_list(rows), f"to_{kind}")(str(tmp_path / f"rows.{kind}"))
    (tmp_path / "t.yaml").write_text(
        f"task: qa\ndataset_path: {kind}\ndataset_kwargs: {{data_files: {{validation: rows.{kind}}}}}\n"
        "validation_split: validation\ndoc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_choice: '{{[a, b]}}'\ndoc_to_target: answer\n"
    )
    assert load_examples(get_task(str(tmp_path / "t.yaml")), "val") == [
        Example("Q: 2+2?\nA:", (" four", " five"), 0), Example("Q: Sky?\nA:", (" green", " blue"), 1)]


def test_a_local_dataset_folder(tmp_path):
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"t": "x", "y": "yes"}])}).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "t.yaml").write_text("task: f\ndataset_path: ds\ntest_split: test\ndoc_to_text: t\ndoc_to_choice: ['no', 'yes']\ndoc_to_target: y\n")
    assert load_examples(get_task(str(tmp_path / "t.yaml")), "test") == [Example("x", (" no", " yes"), 1)]
    (tmp_path / "t.yaml").write_text("task: f\ndataset_path: ds\ntest_split: test\ndoc_to_text: t\ndoc_to_choice: [no, 'yes']\ndoc_to_target: y\n")
    with pytest.raises(DataError, match=r"ds test row 0: doc_to_choice gave \[False, 'yes'\]; .*quote them"):
        load_examples(get_task(str(tmp_path / "t.yaml")), "test")


# --- MultiRC ---------------------------------------------------------------------------------------

MULTIRC_ROW = {"idx": 7, "version": 1.1, "passage": {"text": "Ann has a cat.", "questions": [
    {"idx": 0, "question": "What does Ann have?", "answers": [{"idx": 0, "text": "A cat", "label": 1}, {"idx": 1, "text": "A dog", "label": 0}]},
    {"idx": 1, "question": "Who has a cat?", "answers": [{"idx": 2, "text": "Ann", "label": 1}]},
]}}


def test_multirc_makes_one_example_per_answer(tmp_path):
    (tmp_path / "MultiRC").mkdir()
    (tmp_path / "MultiRC" / "val.jsonl").write_text(json.dumps(MULTIRC_ROW) + "\n")
    examples = load_examples(TASKS["multirc"], "val", tmp_path)
    context = "Ann has a cat.\nQuestion: What does Ann have?\nAnswer:"
    assert examples[:2] == [
        Example(context, (" A cat\nIs the answer correct? no", " A cat\nIs the answer correct? yes"), 1, "7-0"),
        Example(context, (" A dog\nIs the answer correct? no", " A dog\nIs the answer correct? yes"), 0, "7-0"),
    ]
    assert examples[2].text == "Ann has a cat.\nQuestion: Who has a cat?\nAnswer:" and examples[2].group == "7-1"


def test_multirc_fixture_loads():
    examples = load_examples(TASKS["multirc"], "val", FIXTURE_DATA)
    row = json.loads((FIXTURE_DATA / "MultiRC" / "val.jsonl").read_text().splitlines()[0])
    answers = [a for q in row["passage"]["questions"] for a in q["answers"]]
    assert [e.label for e in examples] == [a["label"] for a in answers]
    assert len({e.group for e in examples}) == len(row["passage"]["questions"])


def test_f1a_and_em_on_hand_made_predictions():
    # question a: both answers right; question b: one of two wrong; question c: its one answer right
    labels = torch.tensor([1, 0, 1, 1, 0])
    predicted = torch.tensor([1, 0, 1, 0, 0])
    result = grouped_metrics(predicted, labels, ["a", "a", "b", "b", "c"])
    # positives: 3 true, 2 predicted, both right: precision 1, recall 2/3, F1 0.8
    assert result["f1a"] == pytest.approx(80.0) and result["em"] == pytest.approx(100 * 2 / 3) and result["groups"] == 3


# --- bad input -------------------------------------------------------------------------------------


def test_unknown_key_names_it_and_the_close_matches(tmp_path):
    path = write_task(tmp_path, COPA_YAML.replace("doc_to_text:", "doc_to_txt:"))
    with pytest.raises(TaskFileError, match=rf"{re.escape(str(path))}: unknown key 'doc_to_txt'; did you mean 'doc_to_text'"):
        load_task_file(path)


def test_unsupported_lm_eval_key_is_refused_not_ignored(tmp_path):
    path = write_task(tmp_path, COPA_YAML + "num_fewshot: 5\n")
    with pytest.raises(TaskFileError, match="key 'num_fewshot' is lm-evaluation-harness's, but softprompt does not support it"):
        load_task_file(path)


def test_template_naming_a_missing_field_names_file_field_and_row(tmp_path):
    path = write_task(tmp_path, COPA_YAML.replace("{{ premise.strip()[:-1] }}", "{{ premis }}"))
    data = tmp_path / "data" / "val.jsonl"
    with pytest.raises(DataError, match=rf"^{re.escape(str(data))} row 0: doc_to_text in {re.escape(str(path))} uses 'premis', which this row does not have \(its fields: choice1, choice2, idx, label, premise, question\)"):
        load_examples(get_task(str(path)), "val")


def test_target_outside_the_choices(tmp_path):
    path = write_task(tmp_path, COPA_YAML.replace("doc_to_target: label", "doc_to_target: \"{{ label + 2 }}\""))
    with pytest.raises(DataError, match=r"row 0: target [23] is not one of the 2 choices .* of task my_copa \(doc_to_target must give a choice or its index 0\.\.1"):
        load_examples(get_task(str(path)), "val")


def test_missing_function_file_and_missing_function(tmp_path):
    path = write_task(tmp_path, COPA_YAML.replace("rows.choices", "nowhere.choices"))
    with pytest.raises(TaskFileError, match=rf"!function nowhere\.choices: no file {re.escape(str(tmp_path / 'nowhere.py'))}"):
        load_task_file(path)
    path = write_task(tmp_path, COPA_YAML.replace("rows.choices", "rows.choice"))
    with pytest.raises(TaskFileError, match=r"!function rows\.choice: .*rows\.py has no function 'choice'; did you mean choices\?"):
        load_task_file(path)


def test_a_raising_function_is_named_with_its_row(tmp_path):
    path = write_task(tmp_path, COPA_YAML.replace("rows.choices", "rows.broken"))
    with pytest.raises(DataError, match=r"val\.jsonl row 0: doc_to_choice \(!function rows\.broken in .*task\.yaml\) raised KeyError: 'no such field'"):
        load_examples(get_task(str(path)), "val")
    path = write_task(tmp_path, rows_py="raise RuntimeError('half-written module')\n")
    with pytest.raises(TaskFileError, match=r"importing .*rows\.py raised RuntimeError: half-written module"):
        load_task_file(path)


def test_missing_data_file_names_it_and_the_key(tmp_path):
    path = write_task(tmp_path)
    (tmp_path / "data" / "val.jsonl").unlink()
    with pytest.raises(DataError, match=rf"data file not found: {re.escape(str(tmp_path / 'data' / 'val.jsonl'))} \(dataset_kwargs\.data_files of"):
        load_examples(get_task(str(path)), "val")


def test_missing_task_file_and_invalid_yaml(tmp_path):
    with pytest.raises(TaskFileError, match=r"task file not found: .*nope\.yaml"):
        get_task(str(tmp_path / "nope.yaml"))
    (tmp_path / "bad.yaml").write_text("task: [unclosed\n")
    with pytest.raises(TaskFileError, match=r"bad\.yaml: not valid YAML"):
        get_task(str(tmp_path / "bad.yaml"))


def test_training_on_a_task_without_train_split_names_the_split():
    with pytest.raises(ValueError, match=r"--task boolq: task boolq has no train split: .*boolq\.yaml sets no training_split; it can be evaluated but not trained on"):
        load_train_task("boolq")
