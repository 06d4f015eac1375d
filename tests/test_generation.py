"""generate_until tasks: SQuAD-style metrics on known strings, training on the target's tokens, `generate` prints text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from softprompt.backbones.loading import load_backbone
from softprompt.cli import app
from softprompt.eval.generation import cut_at_stop, exact_match, generation_metrics, normalize_answer, token_f1
from softprompt.tasks.registry import Example, get_task, load_examples
from softprompt.train.config import TrainConfig
from softprompt.train.loop import train
from test_evaluate import full_logits

QA_YAML = """\
task: capitals
dataset_path: json
dataset_kwargs: {data_files: {train: qa.jsonl, validation: qa.jsonl}}
output_type: generate_until
training_split: train
validation_split: validation
doc_to_text: "Q: What is the capital of {{country}}?\\nA:"
doc_to_target: "{{capital}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 4}
init_text: "Answer with the city."
"""
ROWS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Peru", "Lima"), ("Chile", "Santiago"),
        ("Kenya", "Nairobi"), ("Egypt", "Cairo"), ("Cuba", "Havana"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Mali", "Bamako")]


def write_qa(folder: Path) -> Path:
    (folder / "qa.jsonl").write_text("".join(json.dumps({"country": c, "capital": k}) + "\n" for c, k in ROWS))
    (folder / "qa.yaml").write_text(QA_YAML)
    return folder / "qa.yaml"


def test_squad_normalisation_exact_match_and_f1():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the Eiffel tower.", ["Eiffel Tower"]) == 1.0 and exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    # prediction "eiffel" vs "eiffel tower": precision 1, recall 1/2 -> F1 2/3; the best reference counts
    assert token_f1("Eiffel", ["Eiffel Tower"]) == pytest.approx(2 / 3)
    assert token_f1("Eiffel", ["Louvre", "the Eiffel"]) == 1.0 and token_f1("", ["x"]) == 0.0 and token_f1("a", ["the"]) == 1.0
    assert cut_at_stop(" Paris\nQ: next", ("\n",)) == " Paris" and cut_at_stop(" Rome", ("\n",)) == " Rome"


def test_generation_metrics_in_percent():
    examples = [Example("q1", (" Paris",), 0), Example("q2", (" Eiffel Tower",), 0)]
    result = generation_metrics(["paris", "Eiffel"], examples)
    assert result == {"generated_exact_match": 50.0, "token_f1": pytest.approx(100 * (1 + 2 / 3) / 2), "n": 2}


def test_a_generation_task_is_target_tokens_and_trains(tiny_backbone, tmp_path):
    task = get_task(str(write_qa(tmp_path)))
    examples = load_examples(task, "val")
    assert examples[0] == Example("Q: What is the capital of France?\nA:", (" Paris",), 0)
    assert task.until == ("\n",) and task.max_gen_toks == 4
    config = TrainConfig(task=str(tmp_path / "qa.yaml"), num_tokens=4, lr=0.3, epochs=2, min_dev_examples=4, batch_size=4, device="cpu")
    record = train(config, tmp_path / "run", backbone=tiny_backbone, progress=False)
    assert record["status"] == "done" and record["steps"] == 4  # 8 train rows, batches of 4, 2 epochs
    losses = [h["train_loss"] for h in record["history"]]
    assert losses[1] < losses[0]  # the target's tokens are what it learns
    assert record["val"]["n"] == 12 and "exact_match" in record["val"]


def greedy_text(backbone, text: str, max_new_tokens: int, until: tuple[str, ...]) -> str:
    """Greedy decoding by full forwards, one token at a time (no cache), cut at `until` and stripped."""
    ids = backbone.tokenizer(text)["input_ids"]
    new = []
    for _ in range(max_new_tokens):
        new.append(int(full_logits(backbone.model, None, ids + new)[-1].argmax()))
        if new[-1] == backbone.tokenizer.eos_token_id:
            break
    decoded = backbone.tokenizer.decode(new, skip_special_tokens=True)
    return min((decoded[: decoded.find(s)] for s in until if s in decoded), key=len, default=decoded).strip()


def test_generate_prints_the_greedy_continuation(tiny_model_dir, tmp_path):
    backbone = load_backbone(str(tiny_model_dir), "cpu")
    texts = ["Hello", "The capital of France is"]
    runner = CliRunner()
    result = runner.invoke(app, ["generate", "--no-prompt", "--model", str(tiny_model_dir), "--device", "cpu",
                                 "--max-new-tokens", "3", "--text", texts[0], "--text", texts[1]])
    assert result.exit_code == 0, result.output
    assert result.stdout == "".join(greedy_text(backbone, t, 3, ("\n\n",)) + "\n" for t in texts)
    result = runner.invoke(app, ["generate", "--no-prompt", "--model", str(tiny_model_dir), "--device", "cpu",
                                 "--task", str(write_qa(tmp_path)), "--limit", "2"])
    assert result.exit_code == 0, result.output
    written = greedy_text(backbone, "Q: What is the capital of France?\nA:", 4, ("\n",))  # the task's max_gen_toks, until
    assert result.stdout.splitlines()[:2] == ["[0] 'Q: What is the capital of France?\\nA:'", f"  -> {written!r}  (target 'Paris')"]


def test_generate_needs_one_source():
    result = CliRunner().invoke(app, ["generate", "--no-prompt"])
    assert result.exit_code == 2 and 'give --text "..." (repeatable) or --task T' in result.output
