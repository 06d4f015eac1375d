"""The `softprompt` command line. Every option of `train` is derived from `TrainConfig`."""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from enum import Enum
from pathlib import Path

import click
from click.core import ParameterSource
from torch import Tensor

from softprompt.flags import HELP_KEY
from softprompt.backbones.fastpath import ATTENTION_HELP, DTYPE_HELP
from softprompt.backbones.loading import DEFAULT_MODEL, DTYPE_CHOICES, Backbone, load_backbone
from softprompt.eval.evaluate import evaluate
from softprompt.eval.scoring import PromptMode
from softprompt.eval.generation import generate_texts
from softprompt.core.prompt import embed_text
from softprompt.io.runs import atomic_write_json, read_run
from softprompt.io.sources import load_prompt_source
from softprompt.study.executors import ExecutorConfig
from softprompt.serve.config import ServeConfig
from softprompt.tasks.registry import DATA_DIR_ENV, get_task, load_examples
from softprompt.train import distributed
from softprompt.train.config import TrainConfig, config_from_run
from softprompt.train.loop import TrainingDiverged, train


def _click_type(annotation) -> tuple[object, bool]:
    """(click type, optional) for a dataclass field's type hint."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation, optional = args[0], True
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return click.Choice([m.value for m in annotation]), optional
    return annotation, optional


def options_from(config_cls: type, exclude: tuple[str, ...] = (), optional: tuple[str, ...] = ()):
    """A decorator adding one click option per dataclass field: the dataclass is the schema.

    Fields without a default are required options, except those in `optional` (checked by the command).
    """
    hints = typing.get_type_hints(config_cls)

    def decorate(func):
        for f in reversed(dataclasses.fields(config_cls)):
            if f.name in exclude:
                continue
            click_type, _ = _click_type(hints[f.name])
            required = f.default is dataclasses.MISSING and f.name not in optional
            default = None if f.default is dataclasses.MISSING else f.default
            if isinstance(default, Enum):
                default = default.value
            func = click.option(
                f"--{f.name.replace('_', '-')}",
                f.name,
                type=click_type,
                default=default,
                required=required,
                show_default=not required and default is not None,
                help=f.metadata.get(HELP_KEY, ""),
            )(func)
        return func

    return decorate


data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    envvar=DATA_DIR_ENV,
    default=None,
    help=f"Folder of the official SuperGLUE JSONL release (env: {DATA_DIR_ENV}; default: data/superglue).",
)


def _fail(message: str, code: int = 2) -> typing.NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def fast_path_options(command):
    """`--dtype` and `--attention`, the same on every command that runs the model."""
    command = click.option("--attention", default="auto", show_default=True, help=ATTENTION_HELP)(command)
    return click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True, help=DTYPE_HELP)(command)


def load_prompted_backbone(
    prompt_path: Path | None, model: str | None, device: str, dtype: str = "auto", attention: str = "auto"
) -> tuple[Backbone, Tensor | None]:
    """The backbone (`--model`, else the prompt's own model, else the default) and the `[P, H]` prompt checked against it.

    Raises:
        PromptFileError: the prompt's hidden size is not the backbone's, or it was trained under
            another tokenizer. FileNotFoundError: no prompt at `prompt_path`.
    """
    source = load_prompt_source(prompt_path) if prompt_path is not None else None
    backbone = load_backbone(model or (source and source.model) or DEFAULT_MODEL, device, dtype, attention).scoring()  # no training here
    if source is None:
        return backbone, None
    return backbone, load_prompt_source(prompt_path, backbone=backbone).prompt  # every check: hidden size, tokenizer, ...


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="softprompt")
def app() -> None:
    """Train, evaluate and interpret soft prompts on frozen causal language models."""


@app.command("train")
@options_from(TrainConfig, optional=("task",))
@data_dir_option
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run folder for prompt.safetensors, run.json and, until the run finishes, checkpoint.safetensors.")
@click.option(
    "--resume",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Continue the interrupted run in this folder from its last checkpoint, with the config in its run.json.",
)
@click.pass_context
def train_command(ctx: click.Context, out: Path | None, resume: Path | None, data_dir: Path | None, **fields) -> None:
    """Train a soft prompt for one task on a frozen model (or --resume an interrupted run)."""
    if resume is None and fields["task"] is None:
        _fail("missing option --task (required unless --resume RUN_DIR)")
    if resume is None and out is None:
        _fail("missing option --out (required unless --resume RUN_DIR)")
    if resume is not None and out is not None and out.resolve() != resume.resolve():
        _fail(f"--out {out} and --resume {resume} name different folders; give only --resume RUN_DIR")
    out = resume or out
    try:
        if resume is None:
            config = TrainConfig(**fields)
        else:
            given = {k: v for k, v in fields.items() if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
            config = dataclasses.replace(config_from_run(resume), **given)
            if ctx.get_parameter_source("data_dir") is not ParameterSource.COMMANDLINE:
                # a resume reads the data the run started with, not whatever $SOFTPROMPT_DATA_DIR says now
                data_dir = read_run(resume).get("data", {}).get("dir") or data_dir
        distributed.init_from_env()  # launched by torchrun / accelerate launch: one prompt, data-parallel
        main = distributed.is_main()  # rank 0 reports; every rank returns the same record
        record = train(config, out, data_dir=data_dir, resume=resume is not None, progress=main)
    except TrainingDiverged as e:
        _fail(str(e), code=3)
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail(f"interrupted; continue from the last checkpoint with: softprompt train --resume {out}", code=130)
    finally:
        distributed.shutdown()
    if not main:
        return
    dev, val = record["dev"], record["val"]
    click.echo(
        f"{record['task']}: best epoch {record['best_epoch']}, dev accuracy {dev['accuracy']:.1f}, "
        f"val accuracy {val['accuracy']:.1f} (exact match {val['exact_match']:.1f}), {record['wall_s']:.0f} s -> {out}"
    )


TASK_HELP = "Built-in task (cb, rte, copa, wsc, wic, multirc, boolq; see `softprompt tasks`) or a task file (.yaml)."


@app.command("evaluate")
@click.option("--task", required=True, help=TASK_HELP)
@click.option("--prompt", "prompt_path", type=click.Path(path_type=Path), default=None, help="Run folder (finished or imported), PEFT adapter folder, prompt.safetensors or adapter_model.safetensors.")
@click.option("--no-prompt", is_flag=True, help="Zero-shot: no prompt at all.")
@click.option("--text-prompt", is_flag=True, help="The task's discrete good-prompt text, as token embeddings.")
@click.option("--model", default=None, help=f"Backbone (default: the prompt's model, else {DEFAULT_MODEL}).")
@click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N examples of the split, in file order (a quick look; train's --max-val-examples draws a seeded random subsample).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Most examples per forward.")
@click.option("--max-length", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--device", default="auto", show_default=True)
@fast_path_options
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write the metrics as JSON here.")
@data_dir_option
def evaluate_command(task, prompt_path, no_prompt, text_prompt, model, split, limit, batch_size, max_length, device, dtype, attention, out, data_dir):
    """Evaluate a prompt (or no prompt, or the text prompt) on a task: accuracy and exact match."""
    if sum([prompt_path is not None, no_prompt, text_prompt]) != 1:
        _fail("give exactly one of --prompt RUN_DIR, --no-prompt, --text-prompt")
    try:
        task_ = get_task(task)
        mode = PromptMode.SOFT if prompt_path else PromptMode.NONE if no_prompt else PromptMode.TEXT
        backbone, prompt = load_prompted_backbone(prompt_path, model, device, dtype, attention)
        if mode is PromptMode.TEXT:
            prompt = embed_text(backbone.model, backbone.tokenizer, task_.init_text)
        examples = load_examples(task_, split, data_dir)[:limit]
        result = evaluate(backbone, prompt, task_, examples, max_length, batch_size, progress=True)
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(str(e))
    result = {"task": task_.name, "split": split, "mode": mode.value, "model": backbone.name, "dtype": backbone.dtype,
              "hardware": backbone.hardware(), **result}
    if prompt_path is not None:
        result["prompt"] = str(prompt_path)
    click.echo(f"{'task':<6} {'mode':<5} {'split':<5} {'n':>5} {'accuracy':>9} {'exact':>7} {'macro-F1':>9}")
    click.echo(
        f"{result['task']:<6} {result['mode']:<5} {split:<5} {result['n']:>5} {result['accuracy']:>9.1f} "
        f"{result['exact_match']:>7.1f} {result['macro_f1']:>9.1f}"
    )
    if "f1a" in result:  # grouped tasks (MultiRC): SuperGLUE's answer F1 and question exact match
        click.echo(f"F1a {result['f1a']:.1f} over {result['n']} answers, EM {result['em']:.1f} over {result['groups']} questions")
    if out is not None:
        atomic_write_json(out, result)


@app.command("generate")
@click.option("--prompt", "prompt_path", type=click.Path(path_type=Path), default=None, help="Run folder, PEFT adapter folder or prompt file.")
@click.option("--no-prompt", is_flag=True, help="No prompt at all.")
@click.option("--text", "texts", multiple=True, help="Text to continue (repeatable).")
@click.option("--task", default=None, help=TASK_HELP + " Continue its examples instead of --text.")
@click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=5, show_default=True, help="The first N examples of --task's split to continue, in file order.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Default: the task's max_gen_toks, else 32.")
@click.option("--model", default=None, help=f"Backbone (default: the prompt's model, else {DEFAULT_MODEL}).")
@click.option("--max-length", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--device", default="auto", show_default=True)
@fast_path_options
@data_dir_option
def generate_command(prompt_path, no_prompt, texts, task, split, limit, max_new_tokens, model, max_length, device, dtype, attention, data_dir):
    """Print what the prompted model writes (greedy) after each --text, or after --task's examples."""
    if (prompt_path is None) == (not no_prompt):
        _fail("give exactly one of --prompt RUN_DIR, --no-prompt")
    if bool(texts) == (task is not None):
        _fail('give --text "..." (repeatable) or --task T, not both')
    try:
        task_ = get_task(task) if task else None
        examples = load_examples(task_, split, data_dir)[:limit] if task_ else []
        backbone, prompt = load_prompted_backbone(prompt_path, model, device, dtype, attention)
        until = task_.until if task_ else ("\n\n",)
        new = max_new_tokens or (task_.max_gen_toks if task_ else 32)
        outputs = generate_texts(backbone, prompt, list(texts) or [e.text for e in examples], new, until, max_length)
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(str(e))
    for i, output in enumerate(outputs):
        if examples:
            target = examples[i].choices[examples[i].label].strip()
            click.echo(f"[{i}] {examples[i].text!r}\n  -> {output!r}  (target {target!r})")
        else:
            click.echo(output)


@app.command("tasks")
@click.argument("task_files", nargs=-1, type=click.Path(path_type=Path, dir_okay=False))
@data_dir_option
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the table as JSON here.")
def tasks_command(task_files: tuple[Path, ...], data_dir: Path | None, json_out: Path | None) -> None:
    """List the built-in tasks (or the given task files): splits, sizes, choices and the val majority-class rate."""
    from softprompt.tasks.registry import TASKS, task_summary

    try:
        tasks = [get_task(str(path)) for path in task_files] if task_files else list(TASKS.values())
        rows = [task_summary(task, data_dir) for task in tasks]
    except (ValueError, OSError) as e:
        _fail(str(e))
    click.echo(f"{'task':<8} {'type':<15} {'train':>6} {'val':>6} {'majority':>9}  choices")
    for row in rows:
        sizes = [row["splits"][s] for s in ("train", "val")]
        cells = ["-" if n is None else "?" if isinstance(n, str) else str(n) for n in sizes]
        majority = "-" if row["majority_class"] is None else f"{row['majority_class']:.1f}"
        choices = row["choices"] if isinstance(row["choices"], str) else " |".join(row["choices"]).replace("\n", "\\n")
        click.echo(f"{row['task']:<8} {row['output_type']:<15} {cells[0]:>6} {cells[1]:>6} {majority:>9}  {choices}")
        for split, n in row["splits"].items():
            if isinstance(n, str):
                click.echo(f"  {split}: {n}", err=True)
        for note in row["notes"]:
            click.echo(f"  note: {note}")
    if json_out is not None:
        atomic_write_json(json_out, {"tasks": rows})


# --- interpret, study, report ------------------------------------------------------------------


def interpret_findings_options(func):
    """`interpret`'s flags beyond nearest tokens (issue 21): row importance, the reading, elicitation."""
    options = [
        click.option("--rows", is_flag=True, help="Row importance on the task's val split: each row replaced by its init and by the vocabulary mean."),
        click.option("--project", is_flag=True, help="What the reading keeps: accuracy of the nearest tokens as a prompt, as text, and of no prompt."),
        click.option("--elicit", is_flag=True, help="Descriptions the frozen model writes of the prompt (and of its snapshots) in each frame."),
        click.option("--frame", "frames", multiple=True, help="A frame for --elicit with one {prompt} placeholder (repeatable; default: the built-in frames)."),
        click.option("--elicit-tokens", type=click.IntRange(min=1), default=16, show_default=True, help="Tokens per description (greedy)."),
        click.option("--task", default=None, help="Task for --rows/--project and faithfulness (default: the run's own, from run.json)."),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N val examples, in file order (a quick look)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Most prompts x examples per forward."),
        click.option("--max-length", type=click.IntRange(min=2), default=256, show_default=True),
        data_dir_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


@app.command("interpret")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True, help="Nearest tokens per prompt row.")
@click.option("--model", default=None, help="Backbone (default: the model the run was trained on).")
@click.option("--device", default="auto", show_default=True)
@fast_path_options
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the table (and every finding asked for) as JSON here.")
@interpret_findings_options
def interpret_command(
    run_dir: Path, top_k: int, model: str | None, device: str, dtype: str, attention: str, json_out: Path | None, **findings
) -> None:
    """Nearest vocabulary tokens (cosine) of each prompt row, with persisted init tokens and scripts;
    with --rows, --project, --elicit: which rows matter, what that reading keeps, what the model says the prompt means."""
    from softprompt.analysis.interpret import format_table, interpret_run, rows_to_json
    from softprompt.io.runs import read_run

    try:
        record = read_run(run_dir)
        findings = check_findings_flags(run_dir, record, **findings)  # before the backbone loads
        backbone = load_backbone(model or record.get("model") or DEFAULT_MODEL, device, dtype, attention).scoring()
        rows = interpret_run(run_dir, backbone.model, backbone.tokenizer, top_k)
        extra = interpret_findings(run_dir, record, backbone, [row.persisted for row in rows], **findings)
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(str(e))
    click.echo(f"{record.get('task', '?')} prompt in {run_dir} ({len(rows)} rows, model {backbone.name})")
    click.echo(format_table(rows))
    for text in extra.pop("printed"):
        click.echo("\n" + text)
    if json_out is not None:
        atomic_write_json(json_out, {"run": str(run_dir), "task": record.get("task"), "hardware": backbone.hardware(),
                                     "rows": rows_to_json(rows), **extra})


def check_findings_flags(run_dir: Path, record: dict, **flags) -> dict:
    """`interpret`'s finding flags checked, with the task resolved (--task, else run.json's) and the frames chosen.

    Raises:
        ValueError: --rows or --project of a run with no task and no --task; a bad --frame; --frame without --elicit.
    """
    from softprompt.analysis.findings import check_frames

    if flags["frames"] and not flags["elicit"]:
        raise ValueError("--frame goes with --elicit; add --elicit to read the prompt out in your frames")
    flags["frames"] = check_frames(flags["frames"])
    flags["task"] = flags["task"] or record.get("config", {}).get("task") or record.get("task")
    if (flags["rows"] or flags["project"]) and flags["task"] is None:
        wanted = "row importance (--rows)" if flags["rows"] else "the reading's accuracy (--project)"
        raise ValueError(f"{wanted} is scored on the prompt's task, and {run_dir}/run.json names none; give --task")
    if flags["task"] is not None:
        get_task(flags["task"])  # an unknown name fails here, listing the valid ones
    return flags


def interpret_findings(
    run_dir: Path, record: dict, backbone: Backbone, persisted: list[bool], rows: bool, project: bool, elicit: bool,
    frames: tuple[str, ...], elicit_tokens: int, task: str | None, limit: int | None, batch_size: int, max_length: int, data_dir: Path | None,
) -> dict:
    """The findings `interpret`'s flags ask for (checked by `check_findings_flags`), by JSON key, and their tables under `printed`."""
    from softprompt.analysis import findings
    from softprompt.analysis.interpret import run_init_ids
    from softprompt.analysis.reading import what_reading_keeps
    from softprompt.analysis.rows import init_embeddings, row_importance
    from softprompt.data.batch import encode
    from softprompt.io.runs import load_prompt

    task_ = get_task(task) if task else None
    examples = load_examples(task_, "val", data_dir)[:limit] if task_ and (rows or project or elicit) else []
    items = [encode(backbone.tokenizer, e, max_length) for e in examples]
    prompt, _ = load_prompt(run_dir, hidden_size=backbone.hidden_size)
    out: dict = {"printed": []}
    if rows:
        init = init_embeddings(backbone.model, run_init_ids(record, backbone.tokenizer, prompt.shape[0]))
        out["row_importance"] = findings.row_table(row_importance(backbone, prompt, items, init, batch_size), persisted)
        out["printed"].append(findings.format_row_table(out["row_importance"]))
    if project:
        out["reading"] = findings.reading_json(what_reading_keeps(backbone, prompt, items, batch_size))
        out["printed"].append(findings.format_reading(out["reading"]))
    if elicit:
        snapshots = findings.load_snapshots(run_dir, backbone.hidden_size)
        out["elicitation"] = findings.elicitation_json(backbone, prompt, frames, elicit_tokens, task_, items, snapshots, batch_size)
        out["printed"].append(findings.format_elicitation(out["elicitation"]))
    if items:
        out["val_examples"] = len(items)
    return out


@app.command("study")
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Study folder (default: runs/<config name>).")
@click.option("--quiet", is_flag=True, help="No per-epoch progress bars.")
@data_dir_option
@options_from(ExecutorConfig)
def study_command(config_path: Path, out: Path | None, quiet: bool, data_dir: Path | None, **executor_fields) -> None:
    """Train every (task, seed) of a study config, then evaluate, analyse and write report.html (resumable)."""
    from softprompt.study.pipeline import StudyConfig, run_study

    try:
        config = StudyConfig.from_toml(config_path)
        executor = ExecutorConfig(**executor_fields)
        out = out or Path("runs") / config_path.stem
        results = run_study(
            config, out, data_dir=data_dir, progress=not quiet, echo=lambda line: click.echo(line, err=True), executor=executor
        )
    except (ValueError, FileNotFoundError, OSError, ImportError, RuntimeError) as e:
        _fail(str(e))
    click.echo(f"{'task':<6} {'n':>4} {'majority':>9} {'no prompt':>10} {'text':>6} {'soft mean':>10} {'sd':>5} {'vote':>6}")
    for task, ev in results["evaluation"].items():
        vote = (ev.get("ensemble") or {}).get("majority_vote", float("nan"))
        click.echo(
            f"{task:<6} {ev['n']:>4} {ev['majority_class']:>9.1f} {ev['no_prompt']['accuracy']:>10.1f} "
            f"{ev['text_prompt']['accuracy']:>6.1f} {ev['mean_accuracy']:>10.1f} {ev['sd_accuracy']:>5.1f} {vote:>6.1f}"
        )
    click.echo(f"{out / 'report.html'}")


@app.command("report")
@click.argument("study_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
def report_command(study_dir: Path) -> None:
    """Rebuild report.html, the CSV tables and the figures of a study from its results.json (no training)."""
    from softprompt.report.html import write_report

    try:
        click.echo(str(write_report(study_dir)))
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(str(e))


@app.command("export-peft")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
def export_peft_command(run_dir: Path, out_dir: Path) -> None:
    """Write a run's prompt as a PEFT prompt-tuning adapter (PeftModel.from_pretrained reads it)."""
    from softprompt.io.peft import export_peft

    try:
        config = export_peft(run_dir, out_dir)
    except (ValueError, OSError) as e:
        _fail(str(e))
    click.echo(f"PEFT adapter ({config['num_virtual_tokens']} x {config['token_dim']}) -> {out_dir}")


@app.command("import-peft")
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@click.argument("run_dir", type=click.Path(path_type=Path))
def import_peft_command(adapter_dir: Path, run_dir: Path) -> None:
    """Turn a PEFT prompt-tuning adapter into a run folder (evaluate --prompt also reads adapters directly)."""
    from softprompt.io.peft import import_peft

    try:
        path = import_peft(adapter_dir, run_dir)
    except (ValueError, OSError) as e:
        _fail(str(e))
    click.echo(f"imported {adapter_dir} -> {path}")


@app.command("serve")
@click.option("--prompt", "prompts", multiple=True, metavar="NAME=RUN_DIR_OR_PEFT_ADAPTER", help="A prompt to serve under NAME (repeat the flag for more).")
@options_from(ServeConfig)
def serve_command(prompts: tuple[str, ...], **fields) -> None:
    """Serve a bank of prompts on one frozen model over HTTP: /v1/classify, /v1/completions, /v1/models."""
    from softprompt.serve.server import serve

    try:
        serve(fields, list(prompts), echo=lambda line: click.echo(line, err=True))
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(str(e))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
