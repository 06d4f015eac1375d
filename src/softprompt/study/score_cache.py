"""Per-example scores of a prompt on a task's eval set, cached in the study folder.

    scores/<source>__<task>.json    keyed by the prompt's checksum, the eval set's fingerprint and the backbone
                                    (weights, dtype, library versions): reused only for the very same inputs
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from softprompt.backbones.loading import Backbone
from softprompt.data.batch import Encoded, encode
from softprompt.data.splits import val_subsample
from softprompt.eval.scoring import Scores, score
from softprompt.io.runs import atomic_write_json, tensor_sha256
from softprompt.study.config import StudyConfig
from softprompt.study.grid import task_key
from softprompt.tasks.registry import Example, get_task, load_examples


def eval_set(task: str, config: StudyConfig, tokenizer, data_dir: str | Path | None) -> tuple[list[Example], list[Encoded]]:
    """The task's val split as its runs report it (their `max_val_examples` subsample), and encoded."""
    train_config = config.train_config(task, config.seeds[0])
    examples = val_subsample(load_examples(get_task(task), "val", data_dir), train_config.max_val_examples, train_config.data_seed)
    return examples, [encode(tokenizer, e, train_config.max_length) for e in examples]


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
    logprobs = [[None if math.isinf(v) else v for v in row] for row in scores.logprobs[k].tolist()]  # exact: a rounded near-tie could flip
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
        "attention": backbone.attention,  # kernels differ in their last bits
        "dtype_scored": str(backbone.scoring().model.dtype),  # fp32 beside bf16 training weights
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
