"""A study: train every (task, seed), evaluate, analyse, report. Resumable at every stage.

Layout of a study folder:
    study.json              the resolved study config
    runs/<task>-s<seed>/    one training run each (prompt.safetensors + run.json)
    scores/<source>__<task>.json
                            cached per-example scores of one prompt (or none / the text prompt) on one
                            task's eval set, keyed by the prompt's checksum and the eval set's fingerprint
    results.json            every number the report shows
    report.html, *.csv, *.png   written by `softprompt.report.html` from results.json

A run whose run.json says `done` is never retrained; anything else (missing, half-written,
crashed) is retrained from scratch. Scores are recomputed only when the prompt or the eval set changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from softprompt.analysis import measures as analysis
from softprompt.study import stages
from softprompt.backbones.loading import DEFAULT_MODEL, Backbone
from softprompt.data.batch import Encoded, encode
from softprompt.eval.scoring import Scores, metrics, score
from softprompt.analysis.interpret import interpret_prompt, rows_to_json, run_init_ids
from softprompt.core.prompt import InitMethod, embed_text
from softprompt.io.runs import atomic_write_json, load_prompt, read_run, tensor_sha256
from softprompt.study.executors import ExecutorConfig, RunJob, run_jobs, worker_backbone
from softprompt.tasks.superglue import get_task, is_task_file, load_examples
from softprompt.train.config import TrainConfig, load_train_task
from softprompt.data.splits import val_subsample
from softprompt.flags import flag_help

RESULTS_FILE = "results.json"
STUDY_FILE = "study.json"
IN_PROCESS = ExecutorConfig(workers="1")  # the library's default: every run in the caller's process
PER_RUN_KEYS = ("task", "seed")  # set by the study for each run, not in the config file
SHARED_KEYS = ("model", "num_tokens", "device", "dtype")  # one backbone, prompts of one shape: never set per task
RESULT_NEUTRAL_KEYS = ("device", "eval_batch_size")  # a finished run with other values still counts as the same run
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in PER_RUN_KEYS)
PER_TASK_KEYS = tuple(k for k in TRAIN_KEYS if k not in SHARED_KEYS)


@dataclass(frozen=True)
class StudyConfig:
    """A study: the grid tasks x seeds, the TrainConfig fields shared by every run, and evaluation choices.

    In TOML every key sits at the top level: the study's own keys below, plus any TrainConfig field
    except `task` and `seed` (`model`, `num_tokens`, `init`, `lr`, `epochs`, `patience`, ...). A
    table `[per_task.<task>]` overrides training keys for one task (`init = "class-labels"`), all
    but the ones that must be shared for prompts to be compared: `model`, `num_tokens`, `device`.
    """

    tasks: tuple[str, ...] = field(metadata=flag_help("Tasks to train, e.g. [\"cb\", \"rte\", \"copa\", \"wsc\"]."))
    seeds: tuple[int, ...] = field(metadata=flag_help("Training seeds; one run per (task, seed)."))
    train: dict[str, Any] = field(default_factory=dict, metadata=flag_help("TrainConfig fields shared by every run."))
    per_task: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata=flag_help("Training keys for one task, overriding the shared ones: [per_task.rte] init = ...")
    )
    transfer_seed: int | None = field(
        default=None, metadata=flag_help("Whose prompt stands for a task in transfer and similarity (default: the first seed).")
    )
    top_k: int = field(default=3, metadata=flag_help("Nearest tokens per prompt row."))
    name: str = field(default="", metadata=flag_help("A title for the report."))
    spot_steps: int = field(
        default=16, metadata=flag_help("SPoT: optimizer steps for every (source -> target) run and its default-init twin; 0 turns SPoT off.")
    )
    probe_examples: int = field(
        default=8, metadata=flag_help("ON similarity: val contexts per task in the fixed probe set; 0 leaves ON out.")
    )
    ablation_lengths: tuple[int, ...] = field(
        default=(), metadata=flag_help("Lester's ablation: prompt lengths to train for every task x `ablation_inits` (one seed).")
    )
    ablation_inits: tuple[str, ...] = field(default=(), metadata=flag_help("Lester's ablation: inits, e.g. [\"text\", \"random\"]."))

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if not self.tasks:
            raise ValueError("study key `tasks` is empty; list at least one of cb, rte, copa, wsc")
        for task in self.tasks:
            get_task(task)
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"study key `tasks` lists a task twice: {list(self.tasks)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"study key `seeds` must list distinct integers, got {list(self.seeds)}")
        if self.transfer_seed is not None and self.transfer_seed not in self.seeds:
            raise ValueError(f"study key `transfer_seed` = {self.transfer_seed} is not one of `seeds` {list(self.seeds)}")
        if self.top_k < 1:
            raise ValueError(f"study key `top_k` must be at least 1, got {self.top_k}")
        self._check_stage_keys()
        unknown = sorted(set(self.train) - set(TRAIN_KEYS))
        if unknown:
            raise ValueError(f"unknown training key(s) {unknown}; valid keys: {', '.join(TRAIN_KEYS)}")
        for task, overrides in self.per_task.items():
            if task not in self.tasks:
                raise ValueError(f"[per_task.{task}] names a task that is not in `tasks` {list(self.tasks)}")
            bad = sorted(set(overrides) - set(PER_TASK_KEYS))
            if bad:
                raise ValueError(f"[per_task.{task}] cannot set {bad}; per-task keys: {', '.join(PER_TASK_KEYS)}")
        for task in self.tasks:
            try:
                load_train_task(task)  # a task without a train split is refused before anything trains
                self.train_config(task, self.seeds[0])
            except ValueError as e:  # TrainConfig names the CLI flag (--lr); name the TOML key (lr) instead
                where = f"[per_task.{task}]: " if task in self.per_task else ""
                raise ValueError(where + re.sub(r"--([a-z-]+)", lambda m: f"`{m.group(1).replace('-', '_')}`", str(e))) from None

    def _check_stage_keys(self) -> None:
        object.__setattr__(self, "ablation_lengths", tuple(self.ablation_lengths))
        object.__setattr__(self, "ablation_inits", tuple(self.ablation_inits))
        for key in ("spot_steps", "probe_examples"):
            if getattr(self, key) < 0:
                raise ValueError(f"study key `{key}` must be 0 (off) or more, got {getattr(self, key)}")
        if bool(self.ablation_lengths) != bool(self.ablation_inits):
            raise ValueError("study keys `ablation_lengths` and `ablation_inits` go together; set both or neither")
        if any(n < 1 for n in self.ablation_lengths):
            raise ValueError(f"study key `ablation_lengths` must list lengths >= 1, got {list(self.ablation_lengths)}")
        valid = [m.value for m in InitMethod if m is not InitMethod.PROMPT]
        bad = [i for i in self.ablation_inits if i not in valid]
        if bad:
            raise ValueError(f"study key `ablation_inits` has {bad}; choose from {', '.join(valid)}")

    @property
    def model(self) -> str:
        return self.train.get("model", DEFAULT_MODEL)

    @property
    def representative_seed(self) -> int:
        return self.seeds[0] if self.transfer_seed is None else self.transfer_seed

    def train_config(self, task: str, seed: int) -> TrainConfig:
        """A run's config: the shared training keys, then the task's own."""
        keys = {**self.train, **self.per_task.get(task, {})}
        return TrainConfig(task=task, seed=seed, **keys)

    def to_json(self) -> dict:
        study = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}
        study.update(tasks=list(self.tasks), seeds=list(self.seeds), ablation_lengths=list(self.ablation_lengths),
                     ablation_inits=list(self.ablation_inits))
        study["per_task"] = {
            task: {k: v for k, v in self.train_config(task, self.seeds[0]).to_json().items() if k in overrides}
            for task, overrides in self.per_task.items()
        }
        shared = TrainConfig(task=self.tasks[0], seed=self.seeds[0], **self.train).to_json()
        return {**study, **{k: shared[k] for k in TRAIN_KEYS}}

    @classmethod
    def from_dict(cls, data: dict, source: str = "study config") -> StudyConfig:
        """Build from flat TOML keys, checking each key's type.

        Raises:
            ValueError: unknown key, wrong type or invalid value; the message names the key and `source`.
        """
        own = {f.name for f in dataclasses.fields(cls)} - {"train", "per_task"}
        data = dict(data)
        per_task = data.pop("per_task", {})
        if not isinstance(per_task, dict) or not all(isinstance(t, dict) for t in per_task.values()):
            raise ValueError(f"{source}: `per_task` must be tables like [per_task.rte], got {per_task!r}")
        if "max_eval_examples" in data or any("max_eval_examples" in t for t in per_task.values()):
            raise ValueError(
                f"{source}: key `max_eval_examples` is now `max_val_examples` (the same seeded random subsample of each "
                "val split, which every run reports on and the study scores); rename it"
            )
        unknown = sorted(set(data) - own - set(TRAIN_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(own | set(TRAIN_KEYS)))}")
        for key in ("tasks", "seeds"):
            if key not in data:
                raise ValueError(f"{source}: missing key `{key}`")
        hints = typing.get_type_hints(cls) | typing.get_type_hints(TrainConfig)
        for key, value in data.items():
            _check_type(key, value, hints[key], source)
        for task, overrides in per_task.items():
            for key, value in overrides.items():
                if key in hints and key in TRAIN_KEYS:
                    _check_type(key, value, hints[key], f"{source} [per_task.{task}]")
        kwargs = {k: v for k, v in data.items() if k in own}
        try:
            return cls(**kwargs, train={k: v for k, v in data.items() if k in TRAIN_KEYS}, per_task=per_task)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_toml(cls, path: str | Path) -> StudyConfig:
        """Load a study config file.

        Raises:
            FileNotFoundError: no such file. ValueError: bad TOML or a bad key (file and key named).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"study config not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
        return cls.from_dict(data, str(path))


def _check_type(key: str, value: Any, hint: Any, source: str) -> None:
    """Raise a ValueError naming `key` when a TOML value does not fit the field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    allowed = [a for a in args if a is not type(None)] if origin in (typing.Union, types.UnionType) else [hint]
    for kind in allowed:
        base = typing.get_origin(kind) or kind
        if base is tuple and isinstance(value, list):
            inner = typing.get_args(kind)[0]
            if all(isinstance(v, inner) and not (inner is int and isinstance(v, bool)) for v in value):
                return
        elif base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        elif base is int and isinstance(value, int) and not isinstance(value, bool):
            return
        elif isinstance(base, type) and issubclass(base, str) and isinstance(value, str):
            return
        elif base is bool and isinstance(value, bool):
            return
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ValueError(f"{source}: key `{key}` must be {names}, got {value!r}")


def task_key(task: str) -> str:
    """A file-name-safe name for a `tasks` entry: a built-in's name, or a task file's stem."""
    return Path(task).stem if is_task_file(task) else task


def run_name(task: str, seed: int) -> str:
    return f"{task_key(task)}-s{seed}"


def train_all(
    config: StudyConfig, out_dir: Path, backbone: Backbone | None, data_dir: str | Path | None, progress: bool, echo: Callable[[str], None],
    executor: ExecutorConfig | None = None,
) -> dict[str, str]:
    """Train every (task, seed) not already done, resuming unfinished ones, with `executor`. Returns {run name: status}.

    Raises:
        ValueError: a done run was trained with a different config (the message names the keys).
    """
    jobs, statuses = [], {}
    data_dir = None if data_dir is None else str(Path(data_dir).resolve())  # workers may run elsewhere
    grid = [(task, seed) for task in config.tasks for seed in config.seeds]
    for i, (task, seed) in enumerate(grid, start=1):
        name, train_config, label = run_name(task, seed), config.train_config(task, seed), f"run {i}/{len(grid)}: {task} seed {seed}"
        run_dir = (out_dir / "runs" / name).resolve()
        if stages.reusable(train_config, run_dir):
            echo(f"{label} (done, skipped)")
            statuses[name] = "done"
            continue
        statuses[name] = "pending"  # keeps the grid's order
        jobs.append(RunJob(name, train_config, str(run_dir), data_dir, label))
    for name, outcome in run_jobs(jobs, executor or IN_PROCESS, backbone, echo, progress).items():
        statuses[name] = "done" if outcome.status == "skipped" else outcome.status  # skipped: another process finished it
    return statuses


# --- evaluation with a score cache ---------------------------------------------------------------


def eval_items(task: str, config: StudyConfig, tokenizer, data_dir: str | Path | None) -> list[Encoded]:
    """The task's val split as its runs report it (their `max_val_examples` subsample), encoded."""
    train_config = config.train_config(task, config.seeds[0])
    examples = val_subsample(load_examples(get_task(task), "val", data_dir), train_config.max_val_examples, train_config.data_seed)
    return [encode(tokenizer, e, train_config.max_length) for e in examples]


def fingerprint(items: list[Encoded]) -> str:
    """A checksum of an encoded eval set: cached scores are reused only for the very same inputs."""
    data = json.dumps([[item.context, list(item.choices), item.label] for item in items])
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def _cache_path(out_dir: Path, source: str, task: str) -> Path:
    return out_dir / "scores" / f"{source.replace('/', '_').replace(chr(92), '_')}__{task_key(task)}.json"  # a task file's path in `text-<task>`


def _load_cached(path: Path, key: dict) -> Scores | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("key") != key:
        return None
    logprobs = torch.tensor([[[-math.inf if v is None else v for v in row] for row in data["logprobs"]]])
    return Scores(logprobs, torch.tensor([data["exact"]]), torch.tensor(data["labels"]), torch.tensor(data["answer_tokens"]))


def _save_cached(path: Path, key: dict, scores: Scores, k: int) -> None:
    logprobs = [[None if math.isinf(v) else round(v, 5) for v in row] for row in scores.logprobs[k].tolist()]
    payload = {"key": key, "logprobs": logprobs, "exact": scores.exact[k].tolist(), "labels": scores.labels.tolist(),
               "answer_tokens": scores.answer_tokens.tolist()}
    atomic_write_json(path, payload)


def score_cache_model_key(backbone: Backbone) -> dict:
    """What cached scores depend on besides prompt and items: the weights themselves (not the model's name), dtype, library versions."""
    import transformers

    import softprompt

    return {
        "model": backbone.name,
        "weights": backbone.weights_sha256(),
        "dtype": str(backbone.model.dtype),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "softprompt": softprompt.__version__},
    }


def cached_scores(
    out_dir: Path, backbone: Backbone, sources: dict[str, Tensor | None], task: str, items: list[Encoded], batch_size: int,
    echo: Callable[[str], None], progress: bool = False,
) -> dict[str, Scores]:
    """Scores of each named prompt on one task, from the cache where the prompt and items are unchanged.

    Missing soft prompts of equal shape are scored together in one `score` call (`[K, P, H]`: one forward per prompt on each shared batch).
    """
    items_key, model_key = fingerprint(items), score_cache_model_key(backbone)
    keys = {
        s: {**model_key, "task": task, "items": items_key, "prompt": None if p is None else tensor_sha256(p)}
        for s, p in sources.items()
    }
    found = {s: _load_cached(_cache_path(out_dir, s, task), keys[s]) for s in sources}
    missing = [s for s, cached in found.items() if cached is None]
    groups: dict[tuple, list[str]] = {}
    for s in missing:
        groups.setdefault(None if sources[s] is None else tuple(sources[s].shape), []).append(s)
    for shape, names in groups.items():
        echo(f"scoring {', '.join(names)} on {task} ({len(items)} examples)")
        stacked = None if shape is None else torch.stack([sources[s] for s in names])
        if stacked is None and len(names) > 1:
            raise ValueError("at most one no-prompt source per task")
        scores = score(backbone, stacked, items, max(1, batch_size // len(names)), progress=progress)
        for k, s in enumerate(names):
            _save_cached(_cache_path(out_dir, s, task), keys[s], scores, k)
            found[s] = Scores(scores.logprobs[k : k + 1], scores.exact[k : k + 1], scores.labels, scores.answer_tokens)
    return found


# --- the study ---------------------------------------------------------------------------------


def run_study(
    config: StudyConfig,
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    backbone: Backbone | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    executor: ExecutorConfig | None = None,
) -> dict:
    """Train, evaluate and analyse every (task, seed) of a study, then write results.json and the report.

    Re-running continues: done runs and cached scores are reused. `executor` says where the runs
    train (default: one after another in this process; local workers; Ray); the analysis runs here.

    Returns:
        The results (also in `out_dir/results.json`).
    """
    from softprompt.report.html import write_report  # the report reads results.json; imported late to keep matplotlib out of training

    out_dir = Path(out_dir)
    started = time.time()
    atomic_write_json(out_dir / STUDY_FILE, config.to_json())
    statuses = train_all(config, out_dir, backbone, data_dir, progress, echo, executor)
    device, dtype = config.train.get("device", "auto"), config.train.get("dtype", "auto")
    backbone = backbone or worker_backbone(config.model, device, dtype)  # the one in-process runs loaded
    staged = train_stages(config, out_dir, backbone, data_dir, statuses, progress, echo, executor)
    analysis_started = time.time()
    results = analyse(config, out_dir, backbone, data_dir, statuses, echo, progress, staged)
    results["analysis_wall_s"] = round(time.time() - analysis_started, 1)  # scoring, interpretation, statistics
    results["wall_s"] = round(time.time() - started, 1)  # this call, training included (resumed runs count 0)
    atomic_write_json(out_dir / RESULTS_FILE, json_safe(results))
    write_report(out_dir)
    echo(f"wrote {out_dir / 'report.html'}")
    return results


def train_stages(
    config: StudyConfig, out_dir: Path, backbone: Backbone | None, data_dir: str | Path | None, statuses: dict[str, str],
    progress: bool, echo: Callable[[str], None], executor: ExecutorConfig | None = None,
) -> dict:
    """The training stages after the grid, with the grid's executor: SPoT (from each task's representative prompt) and the ablation."""
    seeds_of = {task: [s for s in config.seeds if statuses.get(run_name(task, s)) == "done"] for task in config.tasks}
    representative = {task: _representative(config, task, seeds_of[task]) for task in config.tasks}
    sources = {t: (out_dir / "runs" / r).resolve() for t, r in representative.items() if r}
    base = {t: config.train_config(t, config.representative_seed) for t in config.tasks}
    wanted: dict[Path, TrainConfig] = {}
    if config.spot_steps and len(sources) > 1:
        wanted |= stages.spot_jobs({t: base[t] for t in sources}, sources, config.spot_steps, out_dir.resolve())
    if config.ablation_lengths:
        wanted |= stages.ablation_jobs(base, config.ablation_lengths, config.ablation_inits, out_dir.resolve())
    todo = {run_dir: c for run_dir, c in wanted.items() if not stages.reusable(c, run_dir)}
    data = None if data_dir is None else str(Path(data_dir).resolve())
    jobs = [RunJob(f"{d.parent.name}/{d.name}", c, str(d), data, f"{d.parent.name} {i}/{len(todo)}: {d.name}")
            for i, (d, c) in enumerate(todo.items(), start=1)]
    run_jobs(jobs, executor or IN_PROCESS, backbone, echo, progress)
    out: dict[str, Any] = {}
    if config.spot_steps and len(sources) > 1:
        out["spot"] = stages.spot_results(list(sources), config.spot_steps, out_dir)
    if config.ablation_lengths:
        out["ablation"] = stages.ablation_results(list(config.tasks), config.ablation_lengths, config.ablation_inits, out_dir)
    return out


def analyse(
    config: StudyConfig, out_dir: Path, backbone: Backbone, data_dir: str | Path | None, statuses: dict[str, str],
    echo: Callable[[str], None], progress: bool = False, staged: dict | None = None,
) -> dict:
    """Every analysis of the issue, from the saved runs (never trains)."""
    done = {name: out_dir / "runs" / name for name, status in statuses.items() if status == "done"}
    records = {name: read_run(path) for name, path in done.items()}
    prompts = {name: load_prompt(path, hidden_size=backbone.hidden_size)[0] for name, path in done.items()}
    seeds_of = {task: [s for s in config.seeds if run_name(task, s) in done] for task in config.tasks}
    representative = {task: _representative(config, task, seeds_of[task]) for task in config.tasks}
    batch_size = config.train_config(config.tasks[0], config.seeds[0]).eval_batch_size

    items = {task: eval_items(task, config, backbone.tokenizer, data_dir) for task in config.tasks}
    evaluation, transfer_scores = {}, {}
    for task in config.tasks:
        own = {run_name(task, s): prompts[run_name(task, s)] for s in seeds_of[task]}
        others = {representative[t]: prompts[representative[t]] for t in config.tasks if t != task and representative[t]}
        scores = {}
        for sources in ({"none": None}, {f"text-{task}": _text_prompt(backbone, config, task)}, own | others):
            scores |= cached_scores(out_dir, backbone, sources, task, items[task], batch_size, echo, progress)
        evaluation[task] = _evaluate_task(task, seeds_of[task], scores, items[task])
        evaluation[task]["intervals"] = stages.accuracy_intervals(
            {k: v for k, v in scores.items() if k not in others}, list(own), torch.tensor([i.label for i in items[task]]),
            evaluation[task]["majority_class"], seed=config.representative_seed,
        )
        transfer_scores[task] = {source: metrics(scores[source]) for source in others | own}

    results = {
        "title": config.name,
        "study": config.to_json(),
        "model": backbone.name,
        "tasks": list(config.tasks),
        "protocol": _protocol(config, records, items),
        "runs": {name: _run_summary(name, records.get(name), statuses[name]) for name in statuses},
        "evaluation": evaluation,
        "representative": representative,
    }
    tasks_with_prompt = [t for t in config.tasks if representative[t]]
    results["transfer"] = _transfer(tasks_with_prompt, representative, transfer_scores, evaluation)
    results["similarity"] = _similarity(tasks_with_prompt, representative, prompts, seeds_of)
    results["stochasticity"] = _stochasticity(config, prompts, seeds_of)
    if tasks_with_prompt:
        distance = torch.tensor(results["similarity"]["frobenius"])
        for key in ("accuracy", "exact_match"):
            gain = torch.tensor(results["transfer"][f"gain_{key}"])
            results["transfer"][f"correlation_{key}"] = asdict(analysis.similarity_vs_transfer(distance, gain))
    results["interpret"] = {name: _interpret(backbone, records[name], prompts[name], config.top_k) for name in done}
    results |= staged or {}
    if tasks_with_prompt:
        stacked = torch.stack([prompts[representative[t]] for t in tasks_with_prompt])
        probe = stages.probe_contexts({t: items[t] for t in tasks_with_prompt}, config.probe_examples)
        results["similarity"]["measures"] = stages.similarity_measures(backbone, stacked, probe, batch_size)
        results["similarity"]["probe_contexts"] = len(probe)
        results["predictors"] = stages.predictors(results["similarity"]["measures"], results["transfer"], results.get("spot", {}))
    results["drift"] = stages.drifts(backbone, done)
    return results


def _interpret(backbone: Backbone, record: dict, prompt: Tensor, top_k: int) -> dict:
    init_ids = run_init_ids(record, backbone.tokenizer, prompt.shape[0])
    rows = interpret_prompt(backbone.model, backbone.tokenizer, prompt, init_ids, top_k)
    return {"task": record["task"], "seed": record["config"]["seed"], "rows": rows_to_json(rows)}


def _representative(config: StudyConfig, task: str, seeds: list[int]) -> str | None:
    """The run that stands for a task in transfer and similarity: the transfer seed, else the first done seed."""
    if config.representative_seed in seeds:
        return run_name(task, config.representative_seed)
    return run_name(task, seeds[0]) if seeds else None


def _text_prompt(backbone: Backbone, config: StudyConfig, task: str) -> Tensor:
    """The task's good-prompt text as token embeddings (as `softprompt evaluate --text-prompt`)."""
    text = config.train_config(task, config.seeds[0]).init_text or get_task(task).init_text
    return embed_text(backbone.model, backbone.tokenizer, text)


def _evaluate_task(task: str, seeds: list[int], scores: dict[str, Scores], items: list[Encoded]) -> dict:
    labels = torch.tensor([item.label for item in items])
    majority = 100.0 * float(labels.bincount().max()) / len(labels)
    per_seed = {str(s): metrics(scores[run_name(task, s)]) for s in seeds}
    result = {
        "n": len(items),
        "majority_class": majority,
        "no_prompt": metrics(scores["none"]),
        "text_prompt": metrics(scores[f"text-{task}"]),
        "seeds": per_seed,
    }
    for key in ("accuracy", "exact_match"):
        values = torch.tensor([m[key] for m in per_seed.values()], dtype=torch.float64)
        result[f"mean_{key}"] = float(values.mean()) if len(values) else math.nan
        result[f"sd_{key}"] = float(values.std()) if len(values) > 1 else math.nan
    if seeds:
        logprobs = torch.cat([scores[run_name(task, s)].logprobs for s in seeds])  # [K, E, C]
        result["ensemble"] = asdict(analysis.ensemble(logprobs, labels))
    return result


def _transfer(tasks: list[str], representative: dict[str, str | None], scores: dict[str, dict], evaluation: dict) -> dict:
    """Every task's representative prompt on every task: metric and gain over that task's no-prompt score."""
    out: dict[str, Any] = {"tasks": tasks, "sources": {t: representative[t] for t in tasks}}
    for key in ("accuracy", "exact_match"):
        matrix = torch.tensor([[scores[target][representative[source]][key] for target in tasks] for source in tasks], dtype=torch.float64)
        baseline = torch.tensor([evaluation[t]["no_prompt"][key] for t in tasks], dtype=torch.float64)
        out[key] = matrix.tolist()
        out[f"gain_{key}"] = analysis.transfer_gain(matrix, baseline).tolist()
    return out


def _similarity(
    tasks: list[str], representative: dict[str, str | None], prompts: dict[str, Tensor], seeds_of: dict[str, list[int]]
) -> dict:
    if not tasks:
        return {"tasks": []}
    names = [representative[t] for t in tasks]
    stacked = analysis.stack_prompts([prompts[n] for n in names], names)
    centroids = analysis.stack_prompts([torch.stack([prompts[run_name(t, s)] for s in seeds_of[t]]).mean(0) for t in tasks], tasks)
    return {
        "tasks": tasks,
        "prompts": names,
        "frobenius": analysis.distance_matrix(stacked).tolist(),
        "cosine": analysis.cosine_matrix(stacked).tolist(),
        "centroid_frobenius": analysis.distance_matrix(centroids).tolist(),
    }


def _stochasticity(config: StudyConfig, prompts: dict[str, Tensor], seeds_of: dict[str, list[int]]) -> dict:
    names = [run_name(t, s) for t in config.tasks for s in seeds_of[t]]
    if not names:
        return {"prompts": []}
    groups = [n.rsplit("-s", 1)[0] for n in names]
    stacked = analysis.stack_prompts([prompts[n] for n in names], names)
    task_names, between = analysis.group_distances(analysis.distance_matrix(stacked), groups)
    out = {
        "prompts": names,
        "groups": groups,
        "norms": analysis.frobenius_norms(stacked).tolist(),
        "spread": {t: asdict(analysis.spread(stacked[[g == t for g in groups]])) for t in task_names},
        "group_distances": {"tasks": task_names, "matrix": between.tolist()},
    }
    try:
        maps = analysis.maps_2d(stacked, seed=config.representative_seed)
        out["maps"] = {k: v.tolist() for k, v in maps.items()}
        out["perplexity"] = analysis.perplexity_for(len(names))
    except ValueError as e:
        out["maps_note"] = str(e)
    return out


def _protocol(config: StudyConfig, records: dict[str, dict], items: dict[str, list[Encoded]]) -> dict:
    data = {}
    for task in config.tasks:
        record = next((r for r in records.values() if r["task"] == task), None)
        data[task] = {**(record["data"] if record else {}), "eval": len(items[task])}
    return {"splits": data, "max_val_examples": config.train.get("max_val_examples"), "representative_seed": config.representative_seed}


def _run_summary(name: str, record: dict | None, status: str) -> dict:
    if record is None:
        return {"status": status}
    keys = ("task", "status", "best_epoch", "steps", "wall_s", "dev", "val")
    return {**{k: record.get(k) for k in keys}, "seed": record["config"]["seed"], "epochs_run": len(record.get("history", []))}


def json_safe(obj: Any) -> Any:
    """NaN and infinities become null, so results.json is strict JSON that any tool reads."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
