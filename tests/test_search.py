"""studies/search.py: the compute budget is spent in order and the recipe is chosen on dev, never on val."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SEARCH = Path(__file__).resolve().parents[1] / "studies" / "search.py"
spec = importlib.util.spec_from_file_location("studies_search", SEARCH)
search = importlib.util.module_from_spec(spec)
spec.loader.exec_module(search)


class NoVal(dict):
    """A run record whose val block fails the test if anything reads it."""

    def __getitem__(self, key):
        if key == "val":
            raise AssertionError("the search read val")
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key == "val":
            raise AssertionError("the search read val")
        return super().get(key, default)


def record(accuracy: float, loss: float, steps: int, val_accuracy: float) -> dict:
    history = [{"epoch": 1, "step": steps, "train_loss": 1.0, "dev_loss": loss, "dev_accuracy": accuracy, "tokens_per_s": 5.0}]
    return NoVal(dev={"accuracy": accuracy, "loss": loss, "n": 32, "macro_f1": 40.0}, val={"accuracy": val_accuracy},
                 history=history, best_epoch=1, steps=steps, wall_s=3.0)


def test_budget_is_spent_in_order_on_upper_bound_steps():
    # 20 train examples, batch 8: 3 steps per epoch; candidates cost 6, 12 and 3 steps
    cands = search.candidates([0.1], ["text"], [20], [(2, 1), (4, 2), (1, 1)])
    run, skipped = search.plan(cands, train_examples=20, batch_size=8, budget_steps=10)
    assert [(c["epochs"], c["budget_steps"]) for c in run] == [(2, 6), (1, 3)]  # 6 + 3 fit in 10; 6 + 12 does not
    assert [(c["epochs"], c["budget_steps"]) for c in skipped] == [(4, 12)]


def test_budget_below_the_first_candidate_is_refused():
    with pytest.raises(ValueError, match="--budget-steps 5 does not cover the first candidate \\(6 steps\\)"):
        search.plan(search.candidates([0.1], ["text"], [20], [(2, 1)]), 20, 8, 5)


def test_candidates_cover_the_grid_in_order():
    cands = search.candidates([0.01, 0.1], ["text", "class-labels"], [5, 20], [(12, 4)])
    assert len(cands) == 8
    assert cands[0] == {"lr": 0.01, "init": "text", "num_tokens": 5, "epochs": 12, "patience": 4}
    assert cands[-1] == {"lr": 0.1, "init": "class-labels", "num_tokens": 20, "epochs": 12, "patience": 4}


def test_selection_is_on_dev_and_never_reads_val():
    cands = search.candidates([0.01, 0.03, 0.1], ["text"], [20], [(3, 2)])
    # val would pick lr 0.01 (80.0); dev picks lr 0.1 (65.6 at a lower loss than lr 0.03's tie)
    records = [record(50.0, 1.0, 48, 80.0), record(65.6, 0.99, 48, 40.0), record(65.6, 0.95, 48, 45.0)]
    trials = [search.dev_trial(c, r) for c, r in zip(cands, records)]
    assert '"val"' not in json.dumps(trials)
    assert trials[0]["dev"] == {"accuracy": 50.0, "loss": 1.0, "n": 32}
    assert trials[0]["dev_curve"] == [{"epoch": 1, "step": 48, "dev_loss": 1.0, "dev_accuracy": 50.0}]
    assert search.select(trials)["recipe"]["lr"] == 0.1


def test_a_tie_on_dev_goes_to_fewer_steps():
    cands = search.candidates([0.03, 0.1], ["text"], [20], [(3, 2)])
    trials = [search.dev_trial(c, record(60.0, 0.9, steps, 50.0)) for c, steps in zip(cands, (48, 32))]
    assert search.select(trials)["recipe"]["lr"] == 0.1


def test_nothing_to_select_is_an_error():
    with pytest.raises(ValueError, match="no finished trial to select from"):
        search.select([])


def test_cli_states_the_budget_flag(capsys):
    args = search.parse_args(["--task", "cb", "--budget-steps", "2000", "--epochs-patience", "12:4", "50:5"])
    assert (args.budget_steps, args.epochs_patience, args.results) == (2000, [(12, 4), (50, 5)], search.RESULTS_DIR)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        search.parse_args(["--task", "cb"])  # no budget: refused, as a usage error naming the flag
    assert exit_info.value.code == 2
    assert "the following arguments are required: --budget-steps" in capsys.readouterr().err


def test_a_tiny_search_keeps_only_dev_numbers(tiny_backbone, data_dir, tmp_path):
    args = search.parse_args(["--task", "cb", "--lr", "0.01", "0.1", "--num-tokens", "2", "--epochs-patience", "1:1",
                              "--batch-size", "8", "--max-train-examples", "16", "--min-dev-examples", "4", "--budget-steps", "4",
                              "--data-dir", str(data_dir), "--out", str(tmp_path / "runs")])
    result = search.run_task("cb", args, tiny_backbone)
    # 16 examples / batch 8 = 2 steps per candidate: both fit in 4
    assert [t["recipe"]["lr"] for t in result["trials"]] == [0.01, 0.1] and result["skipped_for_budget"] == []
    assert result["chosen"] == search.select(result["trials"])["recipe"]
    assert '"val"' not in json.dumps(result) and all(set(t) == {"recipe", "dev", "dev_curve", "best_epoch", "steps", "wall_s"} for t in result["trials"])
