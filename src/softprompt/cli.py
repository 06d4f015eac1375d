"""The `softprompt` command line. Every option of `train` is derived from `TrainConfig`."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from enum import Enum
from pathlib import Path

import click

from softprompt.backbone import DEFAULT_MODEL, load_backbone
from softprompt.batch import encode
from softprompt.evaluate import PromptMode, metrics, score
from softprompt.prompt import embed_ids
from softprompt.runs import atomic_write_json, load_prompt
from softprompt.tasks import DATA_DIR_ENV, DataError, get_task, load_examples
from softprompt.train import TrainConfig, TrainingDiverged, train


def _click_type(annotation) -> tuple[object, bool]:
    """(click type, optional) for a dataclass field's type hint."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation, optional = args[0], True
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return click.Choice([m.value for m in annotation]), optional
    return annotation, optional


def options_from(config_cls: type, exclude: tuple[str, ...] = ()):
    """A decorator adding one click option per dataclass field: the dataclass is the schema."""
    hints = typing.get_type_hints(config_cls)

    def decorate(func):
        for f in reversed(dataclasses.fields(config_cls)):
            if f.name in exclude:
                continue
            click_type, _ = _click_type(hints[f.name])
            required = f.default is dataclasses.MISSING
            default = None if required else f.default
            if isinstance(default, Enum):
                default = default.value
            func = click.option(
                f"--{f.name.replace('_', '-')}",
                f.name,
                type=click_type,
                default=default,
                required=required,
                show_default=not required and default is not None,
                help=f.metadata.get("help", ""),
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="softprompt")
def app() -> None:
    """Train, evaluate and interpret soft prompts on frozen causal language models."""


@app.command("train")
@options_from(TrainConfig)
@data_dir_option
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder for prompt.safetensors and run.json.")
def train_command(out: Path, data_dir: Path | None, **fields) -> None:
    """Train a soft prompt for one task on a frozen model."""
    try:
        config = TrainConfig(**fields)
        record = train(config, out, data_dir=data_dir)
    except TrainingDiverged as e:
        _fail(str(e), code=3)
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(str(e))
    dev, val = record["dev"], record["val"]
    click.echo(
        f"{record['task']}: best epoch {record['best_epoch']}, dev accuracy {dev['accuracy']:.1f}, "
        f"val accuracy {val['accuracy']:.1f} (exact match {val['exact_match']:.1f}), {record['wall_s']:.0f} s -> {out}"
    )


@app.command("evaluate")
@click.option("--task", required=True, help="SuperGLUE task: cb, rte, copa or wsc.")
@click.option("--prompt", "prompt_path", type=click.Path(path_type=Path), default=None, help="Run folder or prompt file.")
@click.option("--no-prompt", is_flag=True, help="Zero-shot: no prompt at all.")
@click.option("--text-prompt", is_flag=True, help="The task's discrete good-prompt text, as token embeddings.")
@click.option("--model", default=None, help=f"Backbone (default: the prompt's model, else {DEFAULT_MODEL}).")
@click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-length", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write the metrics as JSON here.")
@data_dir_option
def evaluate_command(task, prompt_path, no_prompt, text_prompt, model, split, batch_size, max_length, device, out, data_dir):
    """Evaluate a prompt (or no prompt, or the text prompt) on a task: accuracy and exact match."""
    if sum([prompt_path is not None, no_prompt, text_prompt]) != 1:
        _fail("give exactly one of --prompt RUN_DIR, --no-prompt, --text-prompt")
    try:
        task_ = get_task(task)
        mode = PromptMode.SOFT if prompt_path else PromptMode.NONE if no_prompt else PromptMode.TEXT
        metadata = {}
        if prompt_path is not None:
            prompt, metadata = load_prompt(prompt_path)
        backbone = load_backbone(model or metadata.get("model", DEFAULT_MODEL), device)
        if mode is PromptMode.SOFT:
            prompt, _ = load_prompt(prompt_path, hidden_size=backbone.hidden_size)
        elif mode is PromptMode.TEXT:
            ids = backbone.tokenizer(task_.init_text, add_special_tokens=False)["input_ids"]
            prompt = embed_ids(backbone.model, ids)
        else:
            prompt = None
        items = [encode(backbone.tokenizer, e, max_length) for e in load_examples(task_, split, data_dir)]
        result = metrics(score(backbone, prompt, items, batch_size, progress=True))
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(str(e))
    result = {"task": task_.name, "split": split, "mode": mode.value, "model": backbone.name, **result}
    if prompt_path is not None:
        result["prompt"] = str(prompt_path)
    click.echo(f"{'task':<6} {'mode':<5} {'split':<5} {'n':>5} {'accuracy':>9} {'exact':>7} {'macro-F1':>9}")
    click.echo(
        f"{result['task']:<6} {result['mode']:<5} {split:<5} {result['n']:>5} {result['accuracy']:>9.1f} "
        f"{result['exact_match']:>7.1f} {result['macro_f1']:>9.1f}"
    )
    if out is not None:
        atomic_write_json(out, result)


@app.command("export-peft")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
def export_peft_command(run_dir: Path, out_dir: Path) -> None:
    """Write a run's prompt as a PEFT prompt-tuning adapter (PeftModel.from_pretrained reads it)."""
    from softprompt.peft_adapter import export_peft

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
    from softprompt.peft_adapter import import_peft

    try:
        path = import_peft(adapter_dir, run_dir)
    except (ValueError, OSError) as e:
        _fail(str(e))
    click.echo(f"imported {adapter_dir} -> {path}")

def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
