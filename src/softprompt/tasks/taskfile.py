"""Task files: lm-evaluation-harness's task YAML (`multiple_choice`, `generate_until`), read by a small loader.

A task file names a dataset (`dataset_path`: `json`, `csv`, `parquet` with
`dataset_kwargs.data_files`, a local dataset folder, a Hugging Face hub id, or softprompt's
`superglue-release`: the official SuperGLUE JSONL files in `--data-dir`), its splits, and how a row
becomes an `Example`: `doc_to_text`, `doc_to_choice` and `doc_to_target`, each a field name, a
Jinja2 template, a literal, or `!function module.name` from a `.py` file beside the YAML, with
lm-eval's semantics. `datasets` reads the files, Jinja2 renders the templates (as in lm-eval); the
rest is here, so that softprompt does not depend on lm-eval (README: "Task files").

softprompt's own optional keys: `init_text` (the good prompt for `--init text`), `label_words` (for
`--init class-labels`), `labels` (the raw target values in choice order, for data whose labels are
names, not indices), `fields` (the JSON types every row must have, checked before anything else),
`group_by` (a field or template grouping examples for exact match per group: MultiRC's questions).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import jinja2
import yaml

from softprompt.tasks.data import JSON_TYPES, DataError, Example, read_jsonl, require, resolve_data_dir, short

SUPERGLUE_RELEASE = "superglue-release"  # dataset_path of the official JSONL files in --data-dir
FILE_BUILDERS = ("json", "csv", "parquet", "text")  # dataset_path values that read dataset_kwargs.data_files
SPLIT_KEYS = {"train": "training_split", "val": "validation_split", "test": "test_split"}

LM_EVAL_KEYS = (
    "task", "output_type", "dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split",
    "test_split", "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter", "process_docs",
    "generation_kwargs", "include",
)
# lm-eval keys that do not change which examples a task makes (metrics, bookkeeping): accepted and not used
IGNORED_KEYS = ("tag", "group", "task_alias", "metric_list", "metadata", "should_decontaminate", "doc_to_decontamination_query", "dataset_name_alias")
OWN_KEYS = ("init_text", "label_words", "labels", "fields", "group_by")
# lm-eval keys that would change the examples and that this loader does not implement: refused, not ignored
UNSUPPORTED_KEYS = (
    "num_fewshot", "fewshot_split", "fewshot_delimiter", "fewshot_config", "description", "filter_list", "repeats",
    "process_results", "doc_to_image", "doc_to_audio", "use_prompt", "gen_prefix", "class", "unsafe_code", "custom_dataset",
)
KNOWN_KEYS = LM_EVAL_KEYS + IGNORED_KEYS + OWN_KEYS
TYPE_NAMES = {name: kind for kind, name in JSON_TYPES.items()}  # "string" -> str, ...


class TaskFileError(DataError):
    """A task file is malformed; the message names the file, the key and the fix."""


class OutputType(str, Enum):
    MULTIPLE_CHOICE = "multiple_choice"  # rank classification over the choices
    GENERATE_UNTIL = "generate_until"  # greedy decoding, compared with the target (exact match, token F1)


@dataclass(frozen=True)
class FunctionRef:
    """`!function module.name`: a function from `module.py` beside the task file."""

    name: str
    function: Callable

    def __call__(self, *args):
        return self.function(*args)


@dataclass(frozen=True)
class Task:
    name: str
    source: Path  # the task file
    output_type: OutputType
    dataset_path: str
    dataset_name: str | None
    dataset_kwargs: dict
    splits: dict[str, str | None]  # "train" / "val" / "test" -> the split's name in the data (None: none)
    doc_to_text: Any  # field name, template, or FunctionRef
    doc_to_choice: Any  # field name, template, literal list, or FunctionRef (None for generate_until)
    doc_to_target: Any  # field name, template, int, literal list, or FunctionRef
    target_delimiter: str
    process_docs: FunctionRef | None
    init_text: str
    label_words: tuple[str, ...]
    label_values: tuple | None  # the `labels` key: raw target values in choice order, index i <-> choices[i]
    fields: dict[str, type]  # "a" or "a.b" -> the JSON type every raw row must have there
    group_by: str | None
    until: tuple[str, ...]  # generate_until: stop strings
    max_gen_toks: int
    notes: tuple[str, ...] = ()  # defaults taken, keys ignored: said by `softprompt tasks` and recorded in run.json
    templates: dict = field(default_factory=dict, hash=False, compare=False, repr=False)  # compiled Jinja2, by source

    @property
    def folder(self) -> str | None:
        """The task's folder in the SuperGLUE release (its `dataset_name`), for `superglue-release` tasks."""
        return self.dataset_name if self.dataset_path == SUPERGLUE_RELEASE else None

    @property
    def labels(self) -> tuple:
        """Raw label values in choice order: the `labels` key, else the indices of the fixed choices."""
        if self.label_values is not None:
            return self.label_values
        return tuple(range(len(self.choice_list))) if self.choice_list else ()

    @property
    def choice_list(self) -> tuple[str, ...] | None:
        """The choices (delimiter in front) when they are the same for every row, else None."""
        if isinstance(self.doc_to_choice, list):
            return tuple(self.target_delimiter + str(c) for c in self.doc_to_choice)
        return None

    def to_example(self, row: dict) -> Example:
        """One raw row (before `process_docs`) as an `Example`: fields checked, templates applied.

        Raises:
            DataError: a field is missing or of the wrong type, a template names a field the row
                does not have, the target is not one of the choices, or a `!function` raised.
        """
        check_fields(row, self.fields)
        return self.render(row)

    def render(self, doc: dict) -> Example:
        """A document (after `process_docs`) as an `Example`."""
        text = self._apply("doc_to_text", doc)
        if not isinstance(text, str):
            raise DataError(f"doc_to_text gave {type(text).__name__} {short(text)}; it must give text ({self.source})")
        group = None if self.group_by is None else str(self._apply("group_by", doc))
        target = self._apply("doc_to_target", doc)
        if self.output_type is OutputType.GENERATE_UNTIL:
            answers = target if isinstance(target, list) else [target]
            if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
                raise DataError(f"doc_to_target gave {short(target)}; a generate_until target must be non-empty text ({self.source})")
            return Example(text, tuple(self.target_delimiter + a for a in answers), 0, group)
        choices = self._apply("doc_to_choice", doc)
        if isinstance(choices, dict):
            choices = list(choices.values())
        if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) for c in choices):
            hint = "; YAML reads unquoted no/yes/on/off/true/false as booleans: quote them" if isinstance(choices, list) and any(isinstance(c, bool) for c in choices) else ""
            raise DataError(f"doc_to_choice gave {short(choices)}; it must give a non-empty list of strings ({self.source}){hint}")
        return Example(text, tuple(self.target_delimiter + c for c in choices), self._target_index(target, list(choices)), group)

    def _target_index(self, target: object, choices: list[str]) -> int:
        if self.label_values is not None:  # raw values in choice order, matched type-exactly (True is not 1)
            for i, known in enumerate(self.label_values):
                if type(target) is type(known) and target == known:
                    return i
            raise DataError(f"unknown label {short(target)} for task {self.name}; expected one of {list(self.label_values)}")
        if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(choices):
            return target
        if isinstance(target, str) and target in choices:
            return choices.index(target)
        raise DataError(
            f"target {short(target)} is not one of the {len(choices)} choices {short(choices, 120)} of task {self.name} "
            f"(doc_to_target must give a choice or its index 0..{len(choices) - 1}; {self.source})"
        )

    def _apply(self, key: str, doc: dict) -> object:
        """lm-eval's rules: a FunctionRef is called, a field name read, a template rendered (and, for
        choices and targets, read as a Python literal), a list or int is itself."""
        spec = getattr(self, key)
        if isinstance(spec, FunctionRef):
            return _call(spec, doc, key, self.source)
        if not isinstance(spec, str):
            return spec
        if spec in doc:
            return doc[spec]
        text = self._render_template(key, spec, doc)
        if key == "doc_to_choice":
            return _literal(text, key, self.source)
        if key == "doc_to_target" and self.output_type is OutputType.MULTIPLE_CHOICE:
            if text.isdigit():
                return int(text)
            if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
                return _literal(text, key, self.source)
        return text

    def _render_template(self, key: str, source: str, doc: dict) -> str:
        template = self.templates.get(source) or self.templates.setdefault(source, compile_template(source, key, self.source))
        try:
            return template.render(**doc)
        except jinja2.UndefinedError as e:
            missing = _undefined_name(e.message or "")
            raise DataError(
                f"{key} in {self.source} uses {missing!r}, which this row does not have (its fields: {', '.join(sorted(doc))})"
            ) from None
        except Exception as e:  # noqa: BLE001 - a template can raise anything (a bad slice, a division); name it
            raise DataError(f"{key} in {self.source} failed on this row ({type(e).__name__}: {clip(str(e))})") from None


JINJA = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined, keep_trailing_newline=True)  # lm-eval's settings
JINJA.filters["regex_replace"] = lambda string, pattern, repl, count=0: re.sub(pattern, repl, string, count=count)


def clip(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters (an exception's message, shown as it is, not as a repr)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def compile_template(source: str, key: str, path: Path) -> jinja2.Template:
    try:
        return JINJA.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TaskFileError(f"{path}: {key} is not a valid Jinja2 template ({e.message}, line {e.lineno}): {short(source)}") from None


def _undefined_name(message: str) -> str:
    """The missing name in a Jinja2 UndefinedError: "'x' is undefined" or "... has no attribute 'x'"."""
    found = re.findall(r"'([^']*)'", message)
    return found[-1] if found else message


def _literal(text: str, key: str, path: Path) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise DataError(f"{key} in {path} rendered {short(text)}, which is not a Python literal ({type(e).__name__})") from None


def _call(function: FunctionRef, doc: object, key: str, path: Path) -> object:
    try:
        return function(doc)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - user code can raise anything; say which function and what
        raise DataError(f"{key} (!function {function.name} in {path}) raised {type(e).__name__}: {clip(str(e))}") from None


def check_fields(row: dict, fields: dict[str, type]) -> None:
    """Check every `fields` entry ("a" or "a.b" -> JSON type) in order; nested ones name their path.

    Raises:
        DataError: a missing field or one of the wrong type.
    """
    for dotted, kind in fields.items():
        *parents, name = dotted.split(".")
        where = "".join(f"{p}." for p in parents)
        container = row
        for parent in parents:
            container = container[parent]  # checked to be an object by an earlier entry
        require(container, name, kind, where=where)


# --- reading the file -----------------------------------------------------------------------------


def _function_loader(path: Path) -> type:
    """A SafeLoader whose `!function module.name` imports `name` from `module.py` beside `path`."""

    class Loader(yaml.SafeLoader):
        pass

    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> FunctionRef:
        return import_function(loader.construct_scalar(node), path)

    Loader.add_constructor("!function", construct)
    return Loader


def import_function(dotted: str, path: Path) -> FunctionRef:
    """`module.name` from `module.py` in the folder of task file `path` (lm-eval's `!function`).

    Raises:
        TaskFileError: no such file, the module fails to import, or it has no such function.
    """
    module_name, _, name = dotted.rpartition(".")
    module_path = path.parent / f"{module_name.replace('.', '/')}.py"
    if not module_name or not module_path.is_file():
        raise TaskFileError(f"{path}: !function {dotted}: no file {module_path} (write `!function module.function` with module.py beside the task file)")
    spec = importlib.util.spec_from_file_location(f"softprompt_taskfile_{module_path.stem}_{abs(hash(str(module_path)))}", module_path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - importing user code can raise anything
        raise TaskFileError(f"{path}: !function {dotted}: importing {module_path} raised {type(e).__name__}: {clip(str(e))}") from None
    function = getattr(module, name, None)
    if not callable(function):
        names = [n for n in vars(module) if callable(vars(module)[n]) and not n.startswith("_")]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; it has: {', '.join(names) or 'no functions'}"
        raise TaskFileError(f"{path}: !function {dotted}: {module_path} has no function {name!r}{hint}")
    return FunctionRef(dotted, function)


def read_task_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The task file's mapping, `include:` files merged under it (lm-eval: the including file wins).

    Raises:
        TaskFileError: missing file, invalid YAML, not a mapping, or an include cycle.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"task file not found: {path}")
    if path.resolve() in seen:
        raise TaskFileError(f"{path}: include cycle ({' -> '.join(str(p) for p in (*seen, path.resolve()))})")
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_function_loader(path))  # noqa: S506 - a SafeLoader plus !function
    except yaml.YAMLError as e:
        raise TaskFileError(f"{path}: not valid YAML ({clip(str(e), 300)})") from None
    except UnicodeDecodeError as e:
        raise TaskFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(config, dict):
        raise TaskFileError(f"{path}: a task file is a YAML mapping (task: ..., dataset_path: ...), got {type(config).__name__}")
    if "include" in config:
        base = read_task_yaml(path.parent / str(config["include"]), (*seen, path.resolve()))
        config = {**base, **{k: v for k, v in config.items() if k != "include"}}
    return config


def check_keys(config: dict, path: Path) -> None:
    """Unknown keys are errors naming the key and its close matches; unsupported lm-eval keys say so.

    Raises:
        TaskFileError: on the first such key.
    """
    for key in config:
        if key in KNOWN_KEYS:
            continue
        if key in UNSUPPORTED_KEYS:
            if key == "num_fewshot" and config[key] in (0, None):
                continue
            raise TaskFileError(f"{path}: key {key!r} is lm-evaluation-harness's, but softprompt does not support it (zero-shot, one template per task); remove it")
        close = difflib.get_close_matches(str(key), KNOWN_KEYS + UNSUPPORTED_KEYS, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f"; known keys: {', '.join(KNOWN_KEYS)}"
        raise TaskFileError(f"{path}: unknown key {key!r}{hint}")


def _fields(spec: object, path: Path, prefix: str = "") -> dict[str, type]:
    if not isinstance(spec, dict):
        raise TaskFileError(f"{path}: `fields` maps field names to JSON types ({', '.join(TYPE_NAMES)}) or to nested mappings, got {short(spec)}")
    out = {}
    for name, kind in spec.items():
        if isinstance(kind, dict):
            out[prefix + name] = dict
            out |= _fields(kind, path, f"{prefix}{name}.")
        elif kind in TYPE_NAMES:
            out[prefix + name] = TYPE_NAMES[kind]
        else:
            raise TaskFileError(f"{path}: fields.{prefix}{name} is {short(kind)}; use one of {', '.join(TYPE_NAMES)}")
    return out


def load_task_file(path: str | Path) -> Task:
    """Read and check a task file (lm-eval's YAML plus softprompt's optional keys).

    Raises:
        TaskFileError: missing file, invalid YAML, an unknown key (with close matches), a missing or
            failing `!function`, a bad template or a missing required key.
    """
    path = Path(path)
    config = read_task_yaml(path)
    check_keys(config, path)
    for key in ("task", "dataset_path", "doc_to_text", "doc_to_target"):
        if config.get(key) in (None, ""):
            raise TaskFileError(f"{path}: missing key {key!r} (a task needs task, dataset_path, doc_to_text, doc_to_target)")
    try:
        output_type = OutputType(config.get("output_type", "multiple_choice"))
    except ValueError:
        raise TaskFileError(f"{path}: output_type {config['output_type']!r} is not supported; use multiple_choice or generate_until") from None
    if output_type is OutputType.MULTIPLE_CHOICE and config.get("doc_to_choice") is None:
        raise TaskFileError(f"{path}: a multiple_choice task needs doc_to_choice (a list, a field, a template or a !function)")
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target", "group_by"):
        if isinstance(config.get(key), str) and ("{{" in config[key] or "{%" in config[key]):
            compile_template(config[key], key, path)  # syntax errors now, not at the first row
    if config.get("process_docs") is not None and not isinstance(config["process_docs"], FunctionRef):
        raise TaskFileError(f"{path}: process_docs must be `!function module.name`, got {short(config['process_docs'])}")
    name = str(config["task"])
    init_text, label_words, notes = _init_defaults(config, output_type, path)
    gen = config.get("generation_kwargs") or {}
    until = gen.get("until", ["\n\n"])
    return Task(
        name=name,
        source=path,
        output_type=output_type,
        dataset_path=str(config["dataset_path"]),
        dataset_name=None if config.get("dataset_name") is None else str(config["dataset_name"]),
        dataset_kwargs=dict(config.get("dataset_kwargs") or {}),
        splits={split: config.get(key) for split, key in SPLIT_KEYS.items()},
        doc_to_text=config["doc_to_text"],
        doc_to_choice=config.get("doc_to_choice"),
        doc_to_target=config["doc_to_target"],
        target_delimiter=str(config.get("target_delimiter", " ")),
        process_docs=config.get("process_docs"),
        init_text=init_text,
        label_words=label_words,
        label_values=None if config.get("labels") is None else tuple(config["labels"]),
        fields=_fields(config.get("fields") or {}, path),
        group_by=config.get("group_by"),
        until=tuple([until] if isinstance(until, str) else until),
        max_gen_toks=int(gen.get("max_gen_toks", 32)),
        notes=tuple(notes + [f"key {k!r} is not used by softprompt" for k in config if k in IGNORED_KEYS]),
    )


def _init_defaults(config: dict, output_type: OutputType, path: Path) -> tuple[str, tuple[str, ...], list[str]]:
    """`init_text` and `label_words`, or defaults that say so: the fixed choices, else the init text's words."""
    notes = []
    delimiter = str(config.get("target_delimiter", " "))
    choices = config.get("doc_to_choice") if isinstance(config.get("doc_to_choice"), list) else None
    init_text = config.get("init_text")
    if init_text is None:
        init_text = f"Answer with one of: {', '.join(map(str, choices))}." if choices else "Read the text and give the right answer."
        notes.append(f"no init_text: --init text starts from {init_text!r}")
    if not isinstance(init_text, str) or not init_text.strip():
        raise TaskFileError(f"{path}: init_text must be non-empty text, got {short(init_text)}")
    label_words = config.get("label_words")
    if label_words is None:
        label_words = [delimiter + str(c) for c in choices] if choices else [" " + w for w in init_text.split()]
        notes.append(f"no label_words: --init class-labels uses {label_words!r}")
    if not isinstance(label_words, list) or not label_words or not all(isinstance(w, str) and w.strip() for w in label_words):
        raise TaskFileError(f"{path}: label_words must be a non-empty list of words, got {short(label_words)}")
    return init_text, tuple(label_words), notes


# --- reading the data -----------------------------------------------------------------------------


def split_name(task: Task, split: str) -> str:
    """The data's name for `split` ("train", "val", "test").

    Raises:
        DataError: the task has no such split (the key and the file are named).
    """
    if split not in SPLIT_KEYS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLIT_KEYS)}")
    name = task.splits[split]
    if name is None:
        raise DataError(f"task {task.name} has no {split} split: {task.source} sets no {SPLIT_KEYS[split]}" + (
            "; it can be evaluated but not trained on" if split == "train" else ""))
    return str(name)


def data_files(task: Task, split: str, data_dir: str | Path | None = None) -> list[Path]:
    """The local files a split is read from (for hashes in run.json); empty for a hub dataset.

    Raises:
        DataError: no such split, or a named file is missing (the task file's key is named).
    """
    name = split_name(task, split)
    if task.dataset_path == SUPERGLUE_RELEASE:
        return [resolve_data_dir(data_dir) / str(task.dataset_name) / f"{name}.jsonl"]
    files = task.dataset_kwargs.get("data_files")
    if task.dataset_path in FILE_BUILDERS:
        if files is None:
            raise TaskFileError(f"{task.source}: dataset_path {task.dataset_path} needs dataset_kwargs.data_files (a file, a list, or split: file)")
        chosen = files.get(name) if isinstance(files, dict) else files
        if chosen is None:
            raise DataError(f"task {task.name}: dataset_kwargs.data_files in {task.source} has no {name!r} entry (it has: {', '.join(files)})")
        paths = [_resolve(task, f) for f in ([chosen] if isinstance(chosen, str) else chosen)]
        for p in paths:
            if not p.is_file():
                raise DataError(f"data file not found: {p} (dataset_kwargs.data_files of {task.source}; relative paths start at the task file's folder)")
        return paths
    folder = _resolve(task, task.dataset_path)
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def _resolve(task: Task, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else task.source.parent / path


def read_documents(task: Task, split: str, data_dir: str | Path | None = None) -> list[tuple[str, dict]]:
    """(where, row) for every raw row of a split: `file:line` for JSONL release files, `file row i` else.

    Raises:
        DataError: missing split or file, a malformed line, or a loading error from `datasets`.
    """
    files = data_files(task, split, data_dir)
    if task.dataset_path == SUPERGLUE_RELEASE:
        return [(f"{files[0]}:{lineno}", row) for lineno, row in read_jsonl(files[0])]
    dataset = _load_dataset(task, split_name(task, split))
    where = str(files[0]) if len(files) == 1 else f"{task.dataset_path} {split_name(task, split)}"
    return [(f"{where} row {i}", row) for i, row in enumerate(dataset)]


def _load_dataset(task: Task, name: str):
    import datasets  # 2-3 s to import: only for tasks that read files through it

    kwargs = dict(task.dataset_kwargs)
    try:
        if task.dataset_path in FILE_BUILDERS:
            files = kwargs.pop("data_files")
            chosen = files[name] if isinstance(files, dict) else files
            resolved = [str(_resolve(task, f)) for f in ([chosen] if isinstance(chosen, str) else chosen)]
            return datasets.load_dataset(task.dataset_path, data_files={name: resolved}, split=name, **kwargs)
        folder = _resolve(task, task.dataset_path)
        if folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(folder))
            return loaded[name] if isinstance(loaded, datasets.DatasetDict) else loaded
        source = str(folder) if folder.is_dir() else task.dataset_path
        return datasets.load_dataset(source, task.dataset_name, split=name, **kwargs)
    except (KeyError, ValueError, FileNotFoundError, ConnectionError, OSError) as e:
        raise DataError(
            f"task {task.name}: cannot load split {name!r} of {task.dataset_path!r} ({type(e).__name__}: {clip(str(e), 300)}); "
            f"check dataset_path and the split keys in {task.source} (a hub id needs a connection: use a local file or folder offline)"
        ) from None


def load_task_examples(task: Task, split: str, data_dir: str | Path | None = None) -> list[Example]:
    """Every example of one split: rows read, fields checked, `process_docs` applied, rendered.

    Raises:
        DataError: the first bad row, with its place (`file:line`, or `file row i`) in front.
    """
    rows = read_documents(task, split, data_dir)
    for where, row in rows:
        _at(where, check_fields, row, task.fields)
    if task.process_docs is None:
        return [_at(where, task.render, row) for where, row in rows]
    import datasets

    docs = _call(task.process_docs, datasets.Dataset.from_list([row for _, row in rows]), "process_docs", task.source)
    where = f"{task.source} process_docs ({split})"
    return [_at(f"{where} doc {i}", task.render, dict(doc)) for i, doc in enumerate(docs)]


def _at(where: str, function: Callable, *args) -> Any:
    """`function(*args)`, with `where` in front of any DataError; other errors from a row become DataErrors."""
    try:
        return function(*args)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    except (TypeError, KeyError, AttributeError, IndexError, ValueError) as e:
        raise DataError(f"{where}: malformed row ({type(e).__name__}: {short(str(e))})") from None
