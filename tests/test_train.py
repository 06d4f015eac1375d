"""Training on tiny models with the fixture data: frozen backbone, exact run folder, divergence, config errors."""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from conftest import ARCHITECTURES, TINY_CONFIGS
from tiny_train import tiny_config as shared_tiny_config
from factories import model_from_config
from softprompt.data.batch import encode, train_batch
from softprompt.eval.scoring import metrics, score
from softprompt.io.runs import CHECKPOINT_FILE, PROMPT_FILE, RUN_FILE, RunWriter, config_differences, load_prompt
from softprompt.tasks.registry import TASKS, load_examples
from softprompt.train.config import TrainConfig, load_train_task
from softprompt.train.loop import TrainingDiverged, initial_prompt, loss_step, train
from softprompt.data.splits import make_splits, val_subsample

# 24 train rows per task in the fixture: a dev slice of 6, 18 left to train on.
TINY = dict(epochs=1, min_dev_examples=6, batch_size=8, max_length=256)


def tiny_config(**overrides) -> TrainConfig:
    return shared_tiny_config(**{**TINY, **overrides})


def run_tiny(backbone, out, data_dir, **overrides) -> dict:
    return train(tiny_config(**overrides), out, backbone=backbone, data_dir=data_dir, progress=False)


def test_only_the_prompt_gets_a_gradient(tiny_backbone, data_dir):
    model = tiny_backbone.model
    assert not any(p.requires_grad for p in model.parameters())
    items = [encode(tiny_backbone.tokenizer, e, 256) for e in load_examples(TASKS["cb"], "train", data_dir)[:4]]
    prompt = torch.nn.Parameter(torch.randn(3, tiny_backbone.hidden_size))
    loss_step(tiny_backbone, prompt, train_batch(items, tiny_backbone.tokenizer.pad_token_id)).backward()
    assert prompt.grad is not None and torch.isfinite(prompt.grad).all() and prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("tiny_backbone", ARCHITECTURES, ids=ARCHITECTURES, indirect=True)
def test_backbone_is_bit_identical_after_training(tiny_backbone, data_dir, tmp_path):
    model = tiny_backbone.model
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    init = initial_prompt(tiny_backbone, TASKS["cb"], tiny_config(), torch.Generator().manual_seed(0))

    record = run_tiny(tiny_backbone, tmp_path, data_dir)

    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == []
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert record["steps"] == 3  # 18 examples in batches of 8
    prompt, _ = load_prompt(tmp_path)
    assert not torch.equal(prompt, init)  # the prompt did train


TRAINABLE = [name for name, task in TASKS.items() if task.splits["train"]]  # all but boolq (no train file here)


@pytest.mark.parametrize("task", TRAINABLE, ids=TRAINABLE)
def test_every_task_trains_and_reports(task, tiny_backbone, data_dir, tmp_path):
    record = run_tiny(tiny_backbone, tmp_path, data_dir, task=task, init="class-labels", max_steps=1)
    n_val = len(load_examples(TASKS[task], "val", data_dir))
    assert record["status"] == "done" and record["task"] == task and record["steps"] == 1
    prompt, metadata = load_prompt(tmp_path)
    assert prompt.shape == (4, tiny_backbone.hidden_size)
    # the reported val numbers are the saved prompt's, recomputed here from the val split
    val_items = [encode(tiny_backbone.tokenizer, e, 256) for e in load_examples(TASKS[task], "val", data_dir)]
    expected = metrics(score(tiny_backbone, prompt, val_items, 32))
    assert record["val"]["n"] == n_val == expected["n"]
    assert record["val"]["accuracy"] == pytest.approx(expected["accuracy"]) and record["val"]["loss"] == pytest.approx(expected["loss"], abs=1e-5)
    assert metadata["vocab_size"] == str(len(tiny_backbone.tokenizer)) and len(metadata["tokenizer_sha256"]) == 64


def test_run_folder_holds_exactly_the_prompt_and_the_record(tiny_backbone, data_dir, tmp_path):
    config = tiny_config(epochs=3, patience=10)
    record = train(config, tmp_path, backbone=tiny_backbone, data_dir=data_dir, progress=False)

    assert sorted(p.name for p in tmp_path.iterdir()) == [PROMPT_FILE, RUN_FILE]
    on_disk = json.loads((tmp_path / RUN_FILE).read_text())
    assert on_disk == record
    assert on_disk["status"] == "done" and on_disk["task"] == "cb" and on_disk["model"] == "random-llama"
    assert on_disk["config"] == config.to_json()
    assert on_disk["config"]["init"] == "text" and on_disk["config"]["early_stop_on"] == "dev"
    assert TrainConfig(**on_disk["config"]) == config  # the record re-creates the run's config
    data = dict(on_disk["data"])
    assert data.pop("dir") == str(Path(data_dir).resolve())
    assert data.pop("task_file") == str(TASKS["cb"].source.resolve())
    for split in ("train", "val"):  # the exact files trained and scored on
        assert data.pop(f"{split}_sha256") == hashlib.sha256((Path(data_dir) / "CB" / f"{split}.jsonl").read_bytes()).hexdigest()
    assert data == {"train": 18, "dev": 6, "val": 6, "early_stop_on": "dev"}
    assert {"softprompt", "torch", "transformers", "python", "git_commit"} <= on_disk["provenance"].keys()
    assert [h["epoch"] for h in on_disk["history"]] == [1, 2, 3]
    assert [h["step"] for h in on_disk["history"]] == [3, 6, 9]
    for h in on_disk["history"]:
        assert {"train_loss", "dev_loss", "dev_accuracy", "tokens_per_s"} <= h.keys()
    assert {"accuracy", "exact_match", "macro_f1", "loss", "n"} <= on_disk["val"].keys()
    assert on_disk["val"]["n"] == 6 and on_disk["dev"]["n"] == 6
    # the prompt kept is the best by dev loss
    best = min(on_disk["history"], key=lambda h: h["dev_loss"])
    assert on_disk["best_epoch"] == best["epoch"]
    assert on_disk["dev"]["loss"] == pytest.approx(best["dev_loss"], abs=1e-5)
    prompt, metadata = load_prompt(tmp_path, hidden_size=tiny_backbone.hidden_size)
    assert prompt.shape == (4, tiny_backbone.hidden_size)
    assert metadata["epoch"] == str(best["epoch"]) and metadata["task"] == "cb" and metadata["init"] == "text"


def test_loss_goes_down_on_a_tiny_overfit(tokenizer, data_dir, tmp_path):
    # initializer_range 0.5: big enough weights that a 4-token prompt can move the output
    backbone = model_from_config({**TINY_CONFIGS["llama"], "initializer_range": 0.5}, tokenizer)
    record = run_tiny(backbone, tmp_path, data_dir, epochs=5, patience=10)
    losses = [h["train_loss"] for h in record["history"]]
    assert losses[-1] < losses[0] - 0.5, losses


def test_same_seed_same_prompt_other_seed_other_prompt(tiny_backbone, data_dir, tmp_path):
    run_tiny(tiny_backbone, tmp_path / "a", data_dir, init="random", seed=1)
    run_tiny(tiny_backbone, tmp_path / "b", data_dir, init="random", seed=1)
    run_tiny(tiny_backbone, tmp_path / "c", data_dir, init="random", seed=2)
    a, b, c = (load_prompt(tmp_path / name)[0] for name in "abc")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_max_steps_and_grad_accum_count_optimizer_steps(tiny_backbone, data_dir, tmp_path):
    assert run_tiny(tiny_backbone, tmp_path / "a", data_dir, epochs=5, max_steps=2)["steps"] == 2
    # 3 batches per epoch, 2 per step: steps after batch 2 and after the last one
    record = run_tiny(tiny_backbone, tmp_path / "b", data_dir, epochs=2, grad_accum=2)
    assert [h["step"] for h in record["history"]] == [2, 4]


def test_nan_loss_stops_with_diverged_status_and_keeps_the_last_good_prompt(tokenizer, data_dir, tmp_path):
    # GPT-2's LayerNorm turns a prompt of +-1e30 (one Adam step at lr 1e30) into NaN
    backbone = model_from_config(TINY_CONFIGS["gpt2"], tokenizer)
    init = initial_prompt(backbone, TASKS["cb"], tiny_config(), torch.Generator().manual_seed(0))

    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 1, step 2; the last good prompt is kept in .*prompt\.safetensors"):
        run_tiny(backbone, tmp_path, data_dir, lr=1e30, epochs=3)

    record = json.loads((tmp_path / RUN_FILE).read_text())
    assert record["status"] == "diverged" and "loss is nan" in record["error"]
    prompt, _ = load_prompt(tmp_path)
    assert torch.isfinite(prompt).all()
    assert torch.equal(prompt, init)  # the last good prompt is the init: no epoch finished


def test_early_stop_on_val_is_recorded(tiny_backbone, data_dir, tmp_path):
    record = run_tiny(tiny_backbone, tmp_path, data_dir, early_stop_on="val")
    counts = {k: v for k, v in record["data"].items() if k not in ("dir", "task_file", "train_sha256", "val_sha256")}
    assert counts == {"train": 24, "dev": 6, "val": 6, "early_stop_on": "val"}  # dev is val, train is all
    assert record["config"]["early_stop_on"] == "val"
    assert record["dev"] == record["val"]


def test_patience_counts_epochs_without_improvement(tiny_backbone, data_dir, tmp_path):
    """lr 1e-30 leaves the prompt bit-identical, so the dev loss never improves after epoch 1."""
    record = run_tiny(tiny_backbone, tmp_path, data_dir, lr=1e-30, epochs=20, patience=2)
    assert len({h["dev_loss"] for h in record["history"]}) == 1
    assert len(record["history"]) == 1 + 2  # the best epoch, then `patience` epochs without a better dev loss
    assert record["best_epoch"] == 1


def test_splits_are_stratified_disjoint_and_seeded_by_data_seed(data_dir):
    task = TASKS["cb"]
    splits = make_splits(task, data_dir, **tiny_config(min_dev_examples=6).split_options())
    assert (len(splits.train), len(splits.dev), len(splits.val)) == (18, 6, 6)
    assert sorted(e.label for e in splits.dev) == [0, 0, 1, 1, 2, 2]
    assert not {e.text for e in splits.train} & {e.text for e in splits.dev}
    assert {e.text for e in splits.train} | {e.text for e in splits.dev} == {e.text for e in load_examples(task, "train", data_dir)}
    same = make_splits(task, data_dir, **tiny_config(seed=5).split_options())  # the training seed does not move the dev slice
    other = make_splits(task, data_dir, **tiny_config(data_seed=5).split_options())
    assert [e.text for e in same.dev] == [e.text for e in splits.dev]
    assert {e.text for e in other.dev} != {e.text for e in splits.dev}
    small = make_splits(task, data_dir, **tiny_config(max_train_examples=6).split_options())
    assert sorted(e.label for e in small.train) == [0, 0, 1, 1, 2, 2]
    assert [e.text for e in small.dev] == [e.text for e in splits.dev]


def test_dev_and_val_subsamples_are_seeded_and_held_out(data_dir):
    """--max-dev-examples keeps a stratified part of the dev slice (the rest is not trained on);
    --max-val-examples keeps the very examples a study with that `max_val_examples` scores, in file order."""
    task = TASKS["cb"]
    full = make_splits(task, data_dir, **tiny_config(min_dev_examples=6).split_options())
    cut = make_splits(task, data_dir, **tiny_config(min_dev_examples=6, max_dev_examples=3, max_val_examples=4).split_options())
    assert sorted(e.label for e in cut.dev) == [0, 1, 2]
    assert {e.text for e in cut.dev} < {e.text for e in full.dev}
    assert [e.text for e in cut.train] == [e.text for e in full.train]
    val = load_examples(task, "val", data_dir)
    assert [e.text for e in cut.val] == [e.text for e in val_subsample(val, 4, 0)]
    assert [val.index(e) for e in cut.val] == sorted(val.index(e) for e in cut.val)
    assert val_subsample(val, 100, 0) == val
    with pytest.raises(ValueError, match=r"--max-dev-examples 2: cannot draw a stratified subsample of 6 examples"):
        make_splits(task, data_dir, **tiny_config(min_dev_examples=6, max_dev_examples=2).split_options())


def test_a_field_missing_from_an_older_run_counts_as_its_default():
    """A run made before --optimizer or --max-dev-examples existed was trained with their defaults: it resumes."""
    config = TrainConfig(task="cb", lr=0.1)
    saved = {k: v for k, v in config.to_json().items() if k not in ("optimizer", "max_dev_examples", "max_val_examples")}
    assert config_differences(saved, config) == {}
    assert config_differences(saved, TrainConfig(task="cb", lr=0.1, optimizer="adafactor")) == {"optimizer": ("adamw", "adafactor")}
    assert config_differences(saved | {"lr": 0.3}, config) == {"lr": (0.3, 0.1)}
    assert config_differences(saved | {"lr": 0.3}, config, ignore=("lr",)) == {}


def test_too_few_examples_for_the_dev_slice(data_dir):
    with pytest.raises(ValueError, match=r"cb has 24 train examples, too few for a dev slice of 32"):
        make_splits(TASKS["cb"], data_dir, **TrainConfig(task="cb").split_options())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_tokens", 0, "--num-tokens must be at least 1, got 0"),
        ("lr", 0.0, "--lr must be a positive number, got 0.0"),
        ("lr", float("nan"), "--lr must be a positive number, got nan"),
        ("patience", -1, "--patience must be >= 0, got -1"),
        ("batch_size", 0, "--batch-size must be at least 1, got 0"),
        ("grad_accum", 0, "--grad-accum must be at least 1, got 0"),
        ("epochs", 0, "--epochs must be at least 1, got 0"),
        ("max_steps", 0, "--max-steps must be at least 1, got 0"),
        ("max_train_examples", -3, "--max-train-examples must be at least 1, got -3"),
        ("max_dev_examples", 0, "--max-dev-examples must be at least 1, got 0"),
        ("max_val_examples", 0, "--max-val-examples must be at least 1, got 0"),
        ("dev_fraction", 1.0, "--dev-fraction must be between 0 and 1, got 1.0"),
        ("weight_decay", -0.1, "--weight-decay must be a number >= 0, got -0.1"),
        ("max_grad_norm", 0.0, "--max-grad-norm must be positive, got 0.0"),
        ("init_text", "  ", "--init-text is empty"),
    ],
    ids=lambda v: v if isinstance(v, str) and not v.startswith("--") and v.strip() else None,
)
def test_config_errors_name_the_flag(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(task="cb", **{field: value})


def test_config_rejects_unknown_task_and_init(tmp_path):
    # the task is checked where it is loaded (TrainConfig reads no files): before any model loads or anything is written
    with pytest.raises(ValueError, match="unknown task 'record'; choose one of: cb, rte, copa, wsc, wic, multirc, boolq"):
        train(TrainConfig(task="record"), tmp_path / "run")
    with pytest.raises(ValueError, match=r"--task boolq: task boolq has no train split: .*boolq\.yaml sets no training_split"):
        load_train_task("boolq")  # evaluation only: the release here has no BoolQ/train.jsonl
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="--init must be one of text, class-labels, vocab, random, prompt, got 'words'"):
        TrainConfig(task="cb", init="words")


def test_config_round_trips_through_json():
    config = TrainConfig(task="wsc", init="class-labels", early_stop_on="val", max_steps=3)
    assert TrainConfig(**json.loads(json.dumps(config.to_json()))) == config
    assert set(config.to_json()) == {f.name for f in fields(TrainConfig)}


@pytest.mark.parametrize("init", ["class-labels", "vocab", "text", "random"])
def test_run_records_the_token_each_row_started_on(tiny_backbone, data_dir, tmp_path, init):
    record = run_tiny(tiny_backbone, tmp_path / "run", data_dir, init=init, max_steps=1, lr=1e-9)
    if init == "random":
        assert record["init_ids"] is None
        return
    start = initial_prompt(tiny_backbone, TASKS["cb"], tiny_config(init=init), torch.Generator().manual_seed(0))
    table = tiny_backbone.model.get_input_embeddings().weight
    assert [torch.equal(table[i], row) for i, row in zip(record["init_ids"], start)] == [True] * start.shape[0]
    if init == "class-labels":  # the verbalizers come first
        labels = [tiny_backbone.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in TASKS["cb"].label_words]
        assert record["init_ids"][: len(labels)] == labels


def test_run_writer_writes_only_where_it_writes(tmp_path):
    """Data-parallel: every rank but 0 gets RunWriter(writes=False), which leaves the folder alone."""
    for writes, folder in ((False, tmp_path / "rank1"), (True, tmp_path / "rank0")):
        writer = RunWriter(folder, writes=writes)
        writer.save_prompt(torch.ones(2, 3), {"task": "cb"})
        writer.save_prompt(torch.ones(2, 3), {"task": "cb"}, "snapshots/epoch-0000.safetensors")
        writer.save_checkpoint({"prompt": torch.ones(2, 3)}, {"step": 1})
        writer.write_record({"status": "running"})
    assert not (tmp_path / "rank1").exists()
    assert sorted(str(p.relative_to(tmp_path / "rank0")) for p in (tmp_path / "rank0").rglob("*.*")) == [
        CHECKPOINT_FILE, PROMPT_FILE, RUN_FILE, "snapshots/epoch-0000.safetensors"]
    RunWriter(tmp_path / "rank0", writes=False).remove_checkpoint()
    assert (tmp_path / "rank0" / CHECKPOINT_FILE).is_file()
    RunWriter(tmp_path / "rank0").remove_checkpoint()
    assert not (tmp_path / "rank0" / CHECKPOINT_FILE).exists()
