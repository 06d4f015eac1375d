"""The study end to end on a tiny random model: every file, resumable, report references every figure."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import FIXTURE_DATA, SHARED_DATA
from softprompt.cli import app
from softprompt.eval.scoring import Scores
from softprompt.io.runs import load_prompt, read_run
from softprompt.report.html import FIGURES, write_report
from softprompt.study.pipeline import StudyConfig, run_study
from softprompt.study.results import accuracy_intervals, task_evaluation
from softprompt.tasks.data import Example
from softprompt.train.config import TrainConfig

STUDIES = sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.toml"))
TABLES = ("accuracy", "ensemble", "stochasticity", "zero_shot", "runs", "similarity", "cosine", "similarity_centroids",
          "transfer_accuracy", "transfer_gain_accuracy", "transfer_exact_match", "transfer_gain_exact_match",
          "correlation", "task_distances", "norms", "maps", "nearest_tokens",
          # issue 14: intervals, measures and their ranking, SPoT, drift, Lester's ablation
          "paired_tests", "budget", "val_examples",  # issue 20: does it learn?
          "accuracy_intervals", "similarity_measures", "similarity_average_token_cosine", "similarity_per_token_cosine",
          "similarity_neuron_overlap", "spot_gain", "spot_accuracy", "spot_default", "drift", "ablation",
          "anchor")  # issue 21: the anchor trade-off




def tiny_study(model: Path, **overrides) -> StudyConfig:
    data = dict(tasks=["cb", "rte"], seeds=[0, 1], model=str(model), num_tokens=4, lr=0.05, epochs=1, max_steps=2,
                batch_size=4, min_dev_examples=4, eval_batch_size=8, top_k=2, device="cpu", max_val_examples=5,
                snapshot_every=1, spot_steps=2, probe_examples=2, ablation_lengths=[1, 4], ablation_inits=["text", "random"],
                anchor_weights=[0.0, 1.0], anchor_tasks=["cb"])
    return StudyConfig.from_dict(data | overrides)


class Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, str] = {}
        self._figure: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self._figure = attrs.get("id", "").removeprefix("fig-")
        if tag == "img" and self._figure:
            self.figures[self._figure] = attrs.get("src", "")


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("study")
    run_study(tiny_study(tiny_model_dir), out, data_dir=FIXTURE_DATA, progress=False, echo=lambda _: None)
    return out


def test_study_writes_every_file(study_dir):
    for name in ("cb-s0", "cb-s1", "rte-s0", "rte-s1"):
        assert json.loads((study_dir / "runs" / name / "run.json").read_text())["status"] == "done"
        assert (study_dir / "runs" / name / "prompt.safetensors").is_file()
    for name in ("results.json", "study.json", "report.html", *(f"{t}.csv" for t in TABLES)):
        assert (study_dir / name).is_file(), name
    for name in FIGURES:  # a decodable PNG with axes and text (dark pixels) and data in clear colour, not a blank canvas
        rgb = matplotlib.image.imread(study_dir / f"{name}.png")[..., :3]
        dark, colourful = int((rgb.min(-1) < 0.5).sum()), int(((rgb.max(-1) - rgb.min(-1)) > 0.25).sum())
        assert min(rgb.shape[:2]) > 100 and dark > 1000 and colourful > 100, (name, dark, colourful)
    results = json.loads((study_dir / "results.json").read_text())
    assert results["transfer"]["tasks"] == ["cb", "rte"]
    assert len(results["interpret"]) == 4 and all(len(r["rows"]) == 4 for r in results["interpret"].values())
    ensemble, seeds = results["evaluation"]["cb"]["ensemble"], results["evaluation"]["cb"]["seeds"]
    # the ensemble's single-prompt numbers are the seeds' own accuracies, computed by another path
    assert ensemble["k"] == 2 and ensemble["best"] == pytest.approx(max(seeds[s]["accuracy"] for s in ("0", "1")))
    assert ensemble["mean"] == pytest.approx((seeds["0"]["accuracy"] + seeds["1"]["accuracy"]) / 2)
    # the diagonal of the transfer matrix is the representative prompt on its own task: same scores as its seed
    assert results["transfer"]["accuracy"][0][0] == results["evaluation"]["cb"]["seeds"]["0"]["accuracy"]
    run_provenance = json.loads((study_dir / "runs" / "cb-s0" / "run.json").read_text())["provenance"]
    assert results["provenance"] == run_provenance  # same versions, machine and commit as the runs it reads
    for task in ("cb", "rte"):  # each run reports on the study's eval subsample (5 of the 6 and 8 val examples)
        for seed in (0, 1):
            record = json.loads((study_dir / "runs" / f"{task}-s{seed}" / "run.json").read_text())
            assert record["data"]["val"] == 5 and record["config"]["max_val_examples"] == 5
            assert record["val"]["accuracy"] == pytest.approx(results["evaluation"][task]["seeds"][str(seed)]["accuracy"])


def csv_matrix(path: Path) -> tuple[list[str], dict[str, list[float | None]]]:
    """A matrix CSV of the report: (column labels, {row label: values}); an empty cell is None (nan in results.json)."""
    header, *rows = list(csv.reader(path.open()))
    return header[1:], {row[0]: [float(v) if v else None for v in row[1:]] for row in rows}


def frobenius(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).sum().sqrt())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_results_agree_with_the_run_folders_and_the_csvs(study_dir):
    """similarity, transfer and SPoT recomputed from the saved prompts and run.json files; every matrix CSV is its block."""
    results = json.loads((study_dir / "results.json").read_text())
    tasks, sim, transfer, spot = results["tasks"], results["similarity"], results["transfer"], results["spot"]
    assert tasks == sim["tasks"] == transfer["tasks"] == spot["tasks"] == ["cb", "rte"]
    assert sim["prompts"] == [transfer["sources"][t] for t in tasks] == ["cb-s0", "rte-s0"]  # seed 0 stands for its task
    prompts = {name: load_prompt(study_dir / "runs" / name)[0] for name in ("cb-s0", "cb-s1", "rte-s0", "rte-s1")}
    centroid = {t: (prompts[f"{t}-s0"] + prompts[f"{t}-s1"]) / 2 for t in tasks}
    measures = sim["measures"]
    for i, a in enumerate(sim["prompts"]):
        for j, b in enumerate(sim["prompts"]):
            pa, pb = prompts[a], prompts[b]
            assert sim["frobenius"][i][j] == measures["frobenius"][i][j] == pytest.approx(frobenius(pa, pb), rel=1e-6, abs=1e-6)
            assert sim["cosine"][i][j] == measures["cosine"][i][j] == pytest.approx(cosine(pa, pb), rel=1e-6)
            assert sim["centroid_frobenius"][i][j] == pytest.approx(frobenius(centroid[tasks[i]], centroid[tasks[j]]), rel=1e-6, abs=1e-6)
            assert measures["average_token_cosine"][i][j] == pytest.approx(cosine(pa.mean(0), pb.mean(0)), rel=1e-6)
            rows = [cosine(x, y) for x in pa for y in pb]  # every pair of prompt tokens
            assert measures["per_token_cosine"][i][j] == pytest.approx(sum(rows) / len(rows), rel=1e-6)
    assert sim["frobenius"][0][1] > 0 and sim["cosine"][0][1] < 1  # two different prompts, not one compared with itself
    overlap = measures["neuron_overlap"]
    assert overlap[0][0] == overlap[1][1] == 1.0 and overlap[0][1] == overlap[1][0] and 0 < overlap[0][1] <= 1
    assert sim["probe_contexts"] == 4  # probe_examples = 2 per task
    for key in ("accuracy", "exact_match"):
        for i, source in enumerate(tasks):
            for j, target in enumerate(tasks):
                no_prompt = results["evaluation"][target]["no_prompt"][key]
                assert transfer[f"gain_{key}"][i][j] == pytest.approx(transfer[key][i][j] - no_prompt, abs=1e-9)
            # the diagonal is the task's own representative (seed 0), scored as its seed
            assert transfer[key][i][i] == results["evaluation"][source]["seeds"]["0"][key]
        # two tasks give two off-diagonal pairs: too few for a correlation, so nan (null) rather than a number
        assert transfer[f"correlation_{key}"] == {"n_pairs": 2, "spearman": None, "spearman_p": None, "pearson": None, "pearson_p": None}
    assert spot["steps"] == 2 and spot["missing"] == []
    for j, target in enumerate(tasks):
        default = read_run(study_dir / "spot" / f"default__{target}")
        assert spot["default"][target] == default["val"]["accuracy"] and default["config"]["max_steps"] == 2
        for i, source in enumerate(tasks):
            if source == target:
                assert spot["accuracy"][i][j] is None and spot["gain"][i][j] is None
                continue
            record = read_run(study_dir / "spot" / f"{source}__{target}")
            assert (record["task"], record["config"]["init"], record["config"]["max_steps"]) == (target, "prompt", 2)
            assert record["config"]["init_from"] == str((study_dir / "runs" / f"{source}-s0").resolve())
            assert spot["accuracy"][i][j] == record["val"]["accuracy"]
            assert spot["gain"][i][j] == pytest.approx(record["val"]["accuracy"] - default["val"]["accuracy"], abs=1e-9)
    matrices = {"similarity": sim["frobenius"], "cosine": sim["cosine"], "similarity_centroids": sim["centroid_frobenius"],
                **{f"similarity_{m}": measures[m] for m in ("average_token_cosine", "per_token_cosine", "neuron_overlap")},
                **{f"transfer_{k}": transfer[k] for k in ("accuracy", "gain_accuracy", "exact_match", "gain_exact_match")},
                "spot_accuracy": spot["accuracy"], "spot_gain": spot["gain"]}
    for name, matrix in matrices.items():
        assert csv_matrix(study_dir / f"{name}.csv") == (tasks, dict(zip(tasks, matrix))), name
    assert csv_matrix(study_dir / "spot_default.csv") == (["val accuracy"], {t: [spot["default"][t]] for t in tasks})
    assert (study_dir / "correlation.csv").read_text().splitlines() == [
        "metric,pairs,Spearman,p,Pearson,p", "accuracy,2,,,,", "exact_match,2,,,,"]


def test_spot_matrix_reads_each_run_folder_into_its_cell(study_dir, tmp_path):
    """The tiny study scores 40% everywhere; distinct accuracies written into copies of its SPoT runs pin rows and columns."""
    from softprompt.study.spot import spot_results

    written = {"default__cb": 10.0, "default__rte": 20.0, "rte__cb": 35.0, "cb__rte": 60.0}
    for name, accuracy in written.items():
        shutil.copytree(study_dir / "spot" / name, tmp_path / "spot" / name)
        record = read_run(tmp_path / "spot" / name)
        (tmp_path / "spot" / name / "run.json").write_text(json.dumps({**record, "val": {**record["val"], "accuracy": accuracy}}))
    out = spot_results(["cb", "rte"], 2, tmp_path)
    assert out["default"] == {"cb": 10.0, "rte": 20.0} and out["missing"] == []
    assert out["accuracy"][0][1] == 60.0 and out["accuracy"][1][0] == 35.0  # rows: source prompt; columns: target
    assert out["gain"][0][1] == 40.0 and out["gain"][1][0] == 25.0  # minus the target's own default
    assert all(math.isnan(out[k][i][i]) for k in ("accuracy", "gain") for i in (0, 1))
    shutil.rmtree(tmp_path / "spot" / "cb__rte")
    assert spot_results(["cb", "rte"], 2, tmp_path)["missing"] == ["cb__rte"]


def test_transfer_rows_are_sources_and_gains_subtract_the_targets_no_prompt():
    from softprompt.study.results import transfer

    # scores[target][source run]: cb's prompt scores 70 on cb and 55 on rte; rte's prompt 45 on cb and 80 on rte
    scores = {"cb": {"cb-s0": {"accuracy": 70.0, "exact_match": 7.0}, "rte-s0": {"accuracy": 45.0, "exact_match": 4.0}},
              "rte": {"cb-s0": {"accuracy": 55.0, "exact_match": 5.0}, "rte-s0": {"accuracy": 80.0, "exact_match": 8.0}}}
    evaluation = {"cb": {"no_prompt": {"accuracy": 40.0, "exact_match": 1.0}}, "rte": {"no_prompt": {"accuracy": 60.0, "exact_match": 4.0}}}
    out = transfer(["cb", "rte"], {"cb": "cb-s0", "rte": "rte-s0"}, scores, evaluation)
    assert out["accuracy"] == [[70.0, 55.0], [45.0, 80.0]] and out["gain_accuracy"] == [[30.0, -5.0], [5.0, 20.0]]
    assert out["exact_match"] == [[7.0, 5.0], [4.0, 8.0]] and out["gain_exact_match"] == [[6.0, 1.0], [3.0, 4.0]]


def test_report_embeds_every_figure(study_dir):
    parser = Images()
    parser.feed((study_dir / "report.html").read_text())
    assert set(parser.figures) == set(FIGURES)
    for name, src in parser.figures.items():
        assert src.startswith("data:image/png;base64,"), name
        assert len(src) > 1000, name


def test_rerun_skips_done_runs_and_cached_scores(study_dir, tiny_model_dir):
    stamps = {p: p.stat().st_mtime_ns for p in (study_dir / "runs").glob("*/*")}
    scores = {p: p.stat().st_mtime_ns for p in (study_dir / "scores").glob("*.json")}
    lines: list[str] = []
    run_study(tiny_study(tiny_model_dir), study_dir, data_dir=FIXTURE_DATA, progress=False, echo=lines.append)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert {p: p.stat().st_mtime_ns for p in scores} == scores
    assert [line for line in lines if line.startswith("run ")] == [
        "run 1/4: cb seed 0 (done, skipped)", "run 2/4: cb seed 1 (done, skipped)",
        "run 3/4: rte seed 0 (done, skipped)", "run 4/4: rte seed 1 (done, skipped)",
    ]
    assert not any(line.startswith("scoring") for line in lines)
    results = json.loads((study_dir / "results.json").read_text())
    assert all(run["reused"] for run in results["runs"].values())  # the report says which runs an earlier call trained


def timeless(history: list[dict]) -> list[dict]:
    """A run's history without its wall-clock throughput: what a repeat of the run must reproduce."""
    return [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in history]


def test_half_written_run_is_resumed(study_dir, tiny_model_dir):
    run = study_dir / "runs" / "rte-s1" / "run.json"
    record = json.loads(run.read_text())
    run.write_text(json.dumps({**record, "status": "running"}))  # as if killed before its first checkpoint
    lines: list[str] = []
    run_study(tiny_study(tiny_model_dir), study_dir, data_dir=FIXTURE_DATA, progress=False, echo=lines.append)
    assert "run 4/4: rte seed 1 (unfinished, resuming)" in lines
    again = json.loads(run.read_text())
    assert again["status"] == "done" and again["resumed_at_step"] == [0]  # no checkpoint: it starts over
    assert timeless(again["history"]) == timeless(record["history"]) and again["val"] == record["val"]  # same seed, same run


def test_done_run_with_other_config_is_refused(study_dir, tiny_model_dir):
    with pytest.raises(ValueError, match=r"different config \(lr: run 0.05 vs study 0.1\)"):
        run_study(tiny_study(tiny_model_dir, lr=0.1), study_dir, data_dir=FIXTURE_DATA, progress=False, echo=lambda _: None)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def colourful_pixels(html: Path, shot: Path) -> int:
    """Render `html` in headless Chromium and count the pixels of clear colour (figures, not text)."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,9000",
               f"--screenshot={shot}", html.as_uri()]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    rgb = matplotlib.image.imread(shot)[..., :3]
    return int(((rgb.max(-1) - rgb.min(-1)) > 0.25).sum())


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium (`make browser` installs Debian's package)")
def test_report_renders_its_figures_in_a_browser(study_dir, tmp_path):
    """A real browser draws every embedded figure: the page has far more colour than the same page with
    its images broken (which is what a bad data URI or a missing file looks like)."""
    html = (study_dir / "report.html").read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r'src="data:image/png;base64,[^"]+"', 'src="data:image/png;base64,AAAA"', html))
    intact = tmp_path / "report.html"
    intact.write_text(html)
    drawn, missing = colourful_pixels(intact, tmp_path / "intact.png"), colourful_pixels(broken, tmp_path / "broken.png")
    assert html.count('src="data:image/png;base64,') == len(FIGURES)
    assert drawn > 5 * missing and drawn > 100_000, (drawn, missing)


def test_report_command_rebuilds_from_files(study_dir, tmp_path):
    shutil.copy(study_dir / "results.json", tmp_path / "results.json")  # a copy: the module's study folder stays intact
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(tmp_path / "report.html")
    parser = Images()
    parser.feed((tmp_path / "report.html").read_text())
    assert set(parser.figures) == set(FIGURES)


def test_report_escapes_token_strings(study_dir, tmp_path):
    results = json.loads((study_dir / "results.json").read_text())
    name = results["representative"]["cb"]
    results["interpret"][name]["rows"][0]["neighbours"][0]["token"] = "<script>alert(1)</script>"
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = write_report(tmp_path).read_text()
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_study_config_loads(path):
    config = StudyConfig.from_toml(path)
    assert set(config.tasks) <= {"cb", "rte", "copa", "wsc", "wic", "multirc"} and config.seeds


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data/superglue")
@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_study_budget_fits_the_whole_superglue_splits(path):
    from softprompt.study.budget import check_budgets

    sizes = check_budgets(StudyConfig.from_toml(path), SHARED_DATA)
    assert sizes.get("cb", {"val": 56})["val"] == 56  # the real CB val split, not the fixture's


@pytest.mark.parametrize(
    ("change", "message"),
    [({"spot_steps": -1}, "`spot_steps` must be 0 \\(off\\) or more, got -1"),
     ({"ablation_lengths": [1, 5]}, "`ablation_lengths` and `ablation_inits` go together"),
     ({"ablation_lengths": [0], "ablation_inits": ["text"]}, "`ablation_lengths` must list lengths >= 1, got \\[0\\]"),
     ({"ablation_lengths": [1], "ablation_inits": ["prompt"]}, "`ablation_inits` has \\['prompt'\\]; choose from text, class-labels, vocab, random"),
     ({"spot_val_examples": 0}, "`spot_val_examples` must be at least 1 \\(leave it out for all\\), got 0"),
     ({"interpret_examples": -2}, "`interpret_examples` must be at least 1 \\(leave it out for all\\), got -2"),
     ({"interpret_tasks": ["copa"]}, "`interpret_tasks` names \\['copa'\\], not in `tasks` \\['cb', 'rte'\\]"),
     ({"interpret_seeds": [0, 3]}, "`interpret_seeds` names \\[3\\], not in `seeds` \\[0\\]")],
    ids=["spot-steps", "ablation-half", "ablation-length", "ablation-init", "spot-val", "interpret-examples", "interpret-task",
         "interpret-seed"],
)
def test_stage_keys_are_checked(change, message):
    with pytest.raises(ValueError, match=message):
        StudyConfig.from_dict(dict(tasks=["cb", "rte"], seeds=[0]) | change)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tasks": []}, "`tasks` is empty"),
        ({"tasks": ["cb", "mnli"]}, "unknown task 'mnli'"),
        ({"seeds": [0, 0]}, "`seeds` must list distinct"),
        ({"lr": "fast"}, "key `lr` must be float"),
        ({"lr": -1.0}, "`lr` must be a positive number"),
        ({"learning_rate": 0.1}, r"unknown key\(s\) \['learning_rate'\]"),
        ({"task": "cb"}, r"unknown key\(s\) \['task'\]"),
        ({"transfer_seed": 7}, "`transfer_seed` = 7 is not one of `seeds`"),
        ({"seeds": [0, True]}, "key `seeds` must be tuple"),
        ({"per_task": {"copa": {"lr": 0.1}}}, r"\[per_task.copa\] names a task that is not in `tasks`"),
        ({"per_task": {"rte": {"num_tokens": 10}}}, r"\[per_task.rte\] cannot set \['num_tokens'\]"),
        ({"per_task": {"rte": {"lr": "fast"}}}, r"\[per_task.rte\]: key `lr` must be float"),
        ({"per_task": {"rte": {"init": "glove"}}}, r"\[per_task.rte\]: `init` must be one of text, class-labels, vocab, random, prompt, got 'glove'"),
        ({"per_task": {"rte": 3}}, "`per_task` must be tables"),
        ({"max_eval_examples": 64}, r"key `max_eval_examples` is now `max_val_examples` \(the same seeded random subsample .*\); rename it"),
    ],
    ids=["no-tasks", "bad-task", "dup-seeds", "lr-type", "lr-value", "unknown-key", "per-run-key", "transfer-seed", "bool-seed",
         "per-task-task", "per-task-shared-key", "per-task-type", "per-task-value", "per-task-table", "renamed-max-eval-examples"],
)
def test_study_config_errors_name_the_key(change, message):
    data = dict(tasks=["cb", "rte"], seeds=[0, 1]) | change
    with pytest.raises(ValueError, match=message):
        StudyConfig.from_dict(data)


def test_per_task_keys_override_the_shared_ones_for_that_task_only(tmp_path):
    config = tmp_path / "study.toml"
    config.write_text('tasks = ["cb", "rte"]\nseeds = [0]\nlr = 0.03\ninit = "text"\n\n[per_task.rte]\ninit = "class-labels"\nlr = 0.1\n')
    study = StudyConfig.from_toml(config)
    cb, rte = study.train_config("cb", 0), study.train_config("rte", 0)
    assert (cb.init.value, cb.lr, rte.init.value, rte.lr) == ("text", 0.03, "class-labels", 0.1)
    saved = study.to_json()
    assert (saved["init"], saved["lr"], saved["per_task"]) == ("text", 0.03, {"rte": {"init": "class-labels", "lr": 0.1}})


def test_done_run_with_other_eval_batch_size_still_counts(study_dir, tiny_model_dir):
    lines: list[str] = []
    run_study(tiny_study(tiny_model_dir, eval_batch_size=3), study_dir, data_dir=FIXTURE_DATA, progress=False, echo=lines.append)
    assert "run 1/4: cb seed 0 (done, skipped)" in lines


def test_missing_key_is_named():
    with pytest.raises(ValueError, match="missing key `seeds`"):
        StudyConfig.from_dict({"tasks": ["cb"]})


def test_study_command_continues_a_study(study_dir, tiny_model_dir, tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(
        f'tasks = ["cb", "rte"]\nseeds = [0, 1]\nmodel = "{tiny_model_dir}"\nnum_tokens = 4\nlr = 0.05\nepochs = 1\nmax_steps = 2\n'
        'batch_size = 4\nmin_dev_examples = 4\neval_batch_size = 8\ntop_k = 2\ndevice = "cpu"\nmax_val_examples = 5\n'
        'snapshot_every = 1\nspot_steps = 2\nprobe_examples = 2\nablation_lengths = [1, 4]\nablation_inits = ["text", "random"]\n'
        'anchor_weights = [0.0, 1.0]\nanchor_tasks = ["cb"]\n'
    )
    result = CliRunner().invoke(app, ["study", str(config), "--out", str(study_dir), "--data-dir", str(FIXTURE_DATA), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "run 4/4: rte seed 1 (done, skipped)" in result.output
    assert re.search(r"^cb +5 ", result.output, re.M) and result.output.strip().endswith("report.html")


def test_study_command_names_the_bad_key(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('tasks = ["cb"]\nseeds = [0]\nepoch = 3\n')
    result = CliRunner().invoke(app, ["study", str(config)])
    assert result.exit_code == 2 and "unknown key(s) ['epoch']" in result.output


def test_report_is_honest_and_highlights_persisted_tokens(study_dir, tmp_path):
    results = json.loads((study_dir / "results.json").read_text())
    cb, rte = results["evaluation"]["cb"], results["evaluation"]["rte"]
    cb["mean_accuracy"], cb["no_prompt"]["accuracy"], cb["majority_class"] = 40.0, 45.0, 33.3
    rte["mean_accuracy"], rte["no_prompt"]["accuracy"], rte["majority_class"] = 70.0, 50.0, 50.0
    results["interpret"][results["representative"]["cb"]]["rows"][0]["persisted"] = True
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = write_report(tmp_path).read_text()
    cb["intervals"]["mean"] |= {"low": 35.0, "high": 45.0}
    rte["intervals"]["mean"] |= {"low": 60.0, "high": 80.0}
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = write_report(tmp_path).read_text()
    assert "CB: mean soft-prompt accuracy 40.0 [95% interval 35.0–45.0] over 2 seed(s) (sd " in text
    assert "does NOT beat no prompt (45.0)" in text
    assert "RTE: mean soft-prompt accuracy 70.0 [95% interval 60.0–80.0] over 2 seed(s)" in text
    assert "beats no prompt (50.0) and the majority class (50.0)" in text
    rte["intervals"]["mean"]["low"], rte["sd_accuracy"] = 49.0, 1.5  # the mean is above the baseline, its interval is not: no verdict of "beats"
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert "RTE: mean soft-prompt accuracy 70.0 [95% interval 49.0–80.0] over 2 seed(s) (sd 1.5) does NOT beat no prompt (50.0)" in write_report(tmp_path).read_text()
    assert text.count('class="cell persisted"') == 1


def scores_predicting(predicted: list[int], labels: list[int]) -> Scores:
    """One prompt's scores whose rank classification picks `predicted` (two choices per example)."""
    logprobs = torch.full((1, len(predicted), 2), -2.0)
    logprobs[0, torch.arange(len(predicted)), torch.tensor(predicted)] = -1.0
    return Scores(logprobs, torch.ones(1, len(predicted), dtype=torch.bool), torch.tensor(labels), torch.ones(len(predicted), dtype=torch.long))


def test_study_evaluation_has_multirc_f1a_and_em():
    """Two questions: q1's answers are labelled (yes, no), q2's (yes, yes); worked by hand below."""
    labels = [1, 0, 1, 1]
    examples = [Example(f"answer {i}", (" no", " yes"), y, group=q) for i, (y, q) in enumerate(zip(labels, ["q1", "q1", "q2", "q2"]))]
    scores = {
        "multirc-s0": scores_predicting([1, 0, 1, 0], labels),  # q1 right, q2 half: TP 2, FP 0, FN 1 -> F1a 0.8, EM 1/2
        "none": scores_predicting([0, 0, 0, 0], labels),  # no answer said yes: F1a 0, EM 0
        "text-multirc": scores_predicting([1, 1, 1, 1], labels),  # TP 3, FP 1 -> F1a 2 * 0.75 / 1.75, only q2 right
    }
    result = task_evaluation("multirc", [0], scores, examples)
    assert result["majority_class"] == 75.0 and result["n"] == 4
    seed = result["seeds"]["0"]
    assert (seed["accuracy"], seed["f1a"], seed["em"], seed["groups"]) == (75.0, pytest.approx(80.0), 50.0, 2)
    assert (result["no_prompt"]["accuracy"], result["no_prompt"]["f1a"], result["no_prompt"]["em"]) == (25.0, 0.0, 0.0)
    assert (result["text_prompt"]["f1a"], result["text_prompt"]["em"]) == (pytest.approx(600 / 7), 50.0)


def test_paired_tests_and_per_seed_verdicts_on_hand_made_scores():
    """10 examples, majority class 50%. No prompt gets only example 9 right; seeds 0 and 2 get all but example 9; seed 1 copies no prompt."""
    labels = [1] * 5 + [0] * 5
    none = [0] * 5 + [1] * 4 + [0]
    good = labels[:9] + [1]
    scores = {"none": scores_predicting(none, labels), "text-cb": scores_predicting(labels, labels),
              "cb-s0": scores_predicting(good, labels), "cb-s1": scores_predicting(none, labels), "cb-s2": scores_predicting(good, labels)}
    out = accuracy_intervals(scores, ["cb-s0", "cb-s1", "cb-s2"], torch.tensor(labels), majority=50.0)
    assert out["baseline"] == 50.0  # max(no prompt 10, majority 50)
    s0, s1 = out["paired"]["cb-s0"], out["paired"]["cb-s1"]
    # seed 0: 9 examples only it gets right, 1 only no prompt: p = 2 * (1 + 10) / 2^10
    assert (s0["prompt_only"], s0["baseline_only"], s0["mcnemar_p"], s0["difference"]) == (9, 1, pytest.approx(22 / 1024), pytest.approx(80.0))
    assert (s1["prompt_only"], s1["baseline_only"], s1["mcnemar_p"], s1["difference"]) == (0, 0, 1.0, 0.0)
    ensemble = out["paired"]["ensemble"]  # the majority vote of the three is seed 0's prediction
    assert (ensemble["prompt_only"], ensemble["baseline_only"]) == (9, 1)
    verdict = out["verdict"]
    assert verdict["seeds"] == {"cb-s0": True, "cb-s1": False, "cb-s2": True}
    assert (verdict["passing"], verdict["failing"], verdict["every_seed"]) == (["cb-s0", "cb-s2"], ["cb-s1"], False)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"max_train_examples": 21}, "`max_train_examples` = 21 does not fit: cb's train split after the dev slice has 20 examples"),
     ({"per_task": {"rte": {"max_train_examples": 64}}}, r"\[per_task.rte\] `max_train_examples` = 64 does not fit: rte's train split after the dev slice has 20"),
     ({"max_val_examples": 7}, "`max_val_examples` = 7 does not fit: cb's val split has 6 examples; set it to 6 or less"),
     ({"per_task": {"rte": {"max_val_examples": 9}}}, r"\[per_task.rte\] `max_val_examples` = 9 does not fit: rte's val split has 8 examples")],
    ids=["train", "train-per-task", "val", "val-per-task"],
)
def test_budget_that_cannot_fit_is_refused_before_training(change, message, tiny_model_dir, tmp_path):
    # the fixture's CB and RTE: 24 train examples, a dev slice of 4 (min_dev_examples), so 20 to train on; val 6 and 8
    data = dict(tasks=["cb", "rte"], seeds=[0], model=str(tiny_model_dir), max_val_examples=5, min_dev_examples=4, device="cpu")
    config = StudyConfig.from_dict(data | change)
    with pytest.raises(ValueError, match=message):
        run_study(config, tmp_path / "study", data_dir=FIXTURE_DATA, progress=False, echo=lambda _: None)
    assert not (tmp_path / "study").exists()  # nothing trained, nothing written


def test_budget_that_fits_exactly_is_accepted():
    from softprompt.study.budget import check_budgets

    config = StudyConfig.from_dict(dict(tasks=["cb"], seeds=[0], max_train_examples=20, max_val_examples=6, min_dev_examples=4))
    assert check_budgets(config, FIXTURE_DATA) == {"cb": {"train": 20, "dev": 4, "val": 6}}


def test_results_record_each_runs_budget_and_learning_curve(study_dir):
    results = json.loads((study_dir / "results.json").read_text())
    for name, run in results["runs"].items():
        record = json.loads((study_dir / "runs" / name / "run.json").read_text())
        assert run["history"] == [{k: h[k] for k in ("epoch", "step", "train_loss", "dev_loss", "dev_accuracy")} for h in record["history"]]
        assert (run["data"]["train"], run["max_epochs"], run["steps"], run["dtype"]) == (record["data"]["train"], 1, 2, record["dtype"])
    # the fixture: CB 24 train (dev slice 4) and 6 val, RTE 24 and 8 val; the study scores 5 of each
    assert results["protocol"]["whole_splits"] == {"cb": {"train": 20, "dev": 4, "val": 6}, "rte": {"train": 20, "dev": 4, "val": 8}}
    assert set(results["stage_wall_s"]) == {"grid training", "SPoT, ablation and anchor-sweep training (backbone load included)", "scoring and analysis"}
    for task in ("cb", "rte"):
        iv = results["evaluation"][task]["intervals"]
        assert set(iv["paired"]) == {f"{task}-s0", f"{task}-s1", "ensemble"} and all(p["n"] == 5 for p in iv["paired"].values())
        assert set(iv["verdict"]["passing"]) | set(iv["verdict"]["failing"]) == {f"{task}-s0", f"{task}-s1"}


def test_report_leads_with_does_it_learn(study_dir, tmp_path):
    results = json.loads((study_dir / "results.json").read_text())
    verdict = results["evaluation"]["cb"]["intervals"]["verdict"]
    verdict |= {"seeds": {"cb-s0": True, "cb-s1": False}, "passing": ["cb-s0"], "failing": ["cb-s1"], "every_seed": False, "baseline": 50.0}
    results["runs"]["rte-s1"] |= {"reused": True, "resumed_at_step": [1]}
    results["runs"]["cb-s0"] |= {"reused": False, "resumed_at_step": []}  # the module's earlier tests re-ran the study
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = write_report(tmp_path).read_text()
    assert text.index("<h2>Does it learn?</h2>") < text.index("<h2>Verdict</h2>") < text.index("<h2>Stochasticity over seeds</h2>")
    assert ('<li class="bad">CB: 1/2 seeds beats max(zero-shot, majority class) with the whole 95% interval above it (50.0); '
            "pass: cb-s0; fail: cb-s1.</li>") in text
    budget = (tmp_path / "budget.csv").read_text().splitlines()
    assert budget[0].startswith("run,status,reused from an earlier call,resumed at step,train examples")
    assert "rte-s1,done,yes,1,20,4,5,1 / 1," in (tmp_path / "budget.csv").read_text()
    assert "cb-s0,done,no,–,20,4,5,1 / 1," in (tmp_path / "budget.csv").read_text()
    assert "cb,6,5,seeded subsample of 5,20" in (tmp_path / "val_examples.csv").read_text()
    paired = (tmp_path / "paired_tests.csv").read_text()
    assert paired.count("\ncb,") == 3 and "majority vote of the seeds" in paired and ",NO\n" in paired
    recorded = results["runs"]["cb-s0"]["hardware"]  # the fast path's block in every run.json
    assert f"model: {recorded['model']}, " in text and f"attention: {recorded['attention']}" in text
    assert "Time per stage (this call): grid training" in text
    results["runs"]["cb-s0"]["hardware"] = {"cpu": "Intel Xeon 8480+", "bf16": "amx"}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert "Machine: cpu: Intel Xeon 8480+, bf16: amx;" in write_report(tmp_path).read_text()


def test_paper_toml_encodes_the_papers_protocol():
    from softprompt.report.paper import PAPER_PROTOCOL, PAPER_TABLE1

    config = StudyConfig.from_toml(Path(__file__).resolve().parents[1] / "studies" / "paper.toml")
    assert sorted(config.tasks) == sorted(PAPER_PROTOCOL["tasks"]) == ["cb", "copa", "rte", "wsc"]
    assert config.tasks[-1] == "rte"  # the costliest runs last, so a study stopped halfway has the others
    assert len(config.seeds) == PAPER_PROTOCOL["seeds"] == 4
    rte_subsample = config.train_config("rte", 0).max_train_examples
    for task in config.tasks:
        run = config.train_config(task, 0)
        assert (run.epochs, run.patience, run.num_tokens, run.max_val_examples) == (50, 5, 20, None)  # whole val splits
        assert run.max_train_examples == (rte_subsample if task == "rte" else None)  # only RTE subsampled
    assert rte_subsample is not None and rte_subsample < 2241  # a subsample of RTE's train after its dev slice
    # the comment states the subsample the config sets
    assert f"subsample of {rte_subsample} of its 2,241" in (Path(__file__).resolve().parents[1] / "studies" / "paper.toml").read_text()
    assert PAPER_TABLE1 == {"cb": (119.2, 1.31), "rte": (107.7, 3.5), "copa": (111.2, 38.5), "wsc": (135.3, 3.8)}


def test_report_puts_the_papers_transfer_cell_beside_ours(study_dir, tmp_path):
    results = json.loads((study_dir / "results.json").read_text())
    results["tasks"], results["transfer"]["tasks"] = ["cb", "copa"], ["cb", "copa"]
    results["transfer"]["gain_exact_match"] = [[5.0, -1.5], [2.0, 0.0]]
    results["evaluation"]["copa"] = results["evaluation"].pop("rte")
    (tmp_path / "results.json").write_text(json.dumps(results))
    write_report(tmp_path)
    assert (tmp_path / "transfer_beside_paper.csv").read_text().splitlines() == [
        "source prompt,target task,ours,paper", "cb,cb,5.0,", "cb,copa,-1.5,0.4", "copa,cb,2.0,", "copa,copa,0.0,"]


@pytest.mark.parametrize(("own", "cap", "expected"), [(None, 64, 64), (56, 64, 56), (277, 64, 64), (277, None, 277), (None, None, None)])
def test_spot_runs_score_on_at_most_spot_val_examples(tmp_path, own, cap, expected):
    from softprompt.study.spot import spot_jobs

    base = {t: TrainConfig(task=t, max_val_examples=own) for t in ("cb", "rte")}
    jobs = spot_jobs(base, {"cb": tmp_path / "cb-s0", "rte": tmp_path / "rte-s0"}, 4, tmp_path, val_examples=cap)
    assert sorted(p.name for p in jobs) == ["cb__rte", "default__cb", "default__rte", "rte__cb"]
    assert {c.max_val_examples for c in jobs.values()} == {expected}
    assert {c.max_steps for c in jobs.values()} == {4}
