"""The one evaluation: a backbone, a prompt, a task and its examples -> every metric of that task.

`softprompt evaluate`, the end of `train` and (on its cached scores, through the same `task_metrics`)
the study all report these numbers, so a metric added here reaches all three.
"""

from __future__ import annotations

from torch import Tensor

from softprompt.backbones.loading import Backbone
from softprompt.data.batch import encode
from softprompt.eval.generation import generate_texts, generation_metrics
from softprompt.eval.scoring import score
from softprompt.eval.task_metrics import task_metrics
from softprompt.tasks.data import Example
from softprompt.tasks.taskfile import Task


def evaluate(
    backbone: Backbone, prompt: Tensor | None, task: Task, examples: list[Example], max_length: int = 256,
    batch_size: int = 32, progress: bool = False,
) -> dict[str, float]:
    """Score `examples` of `task` after `prompt` and compute the task's metrics, in percent.

    Args:
        prompt: `[P, H]` soft prompt (or text prompt as embeddings); None for no prompt.
        examples: the split's examples (their `group` ids give grouped metrics).
        max_length: most tokens of context + answer per example (longer contexts lose their start).
        batch_size: most examples per forward.

    Returns:
        `accuracy` (rank classification), `exact_match`, `macro_f1`, `loss`, `n`; `f1a`, `em` and
        `groups` when the examples carry groups (MultiRC); `generated_exact_match` and `token_f1`
        from greedy decoding for `generate_until` tasks.
    """
    items = [encode(backbone.tokenizer, e, max_length) for e in examples]
    result = task_metrics(score(backbone, prompt, items, batch_size, progress=progress), examples)
    if task.output_type.value == "generate_until":  # greedy decoding, compared with the target
        texts = generate_texts(backbone, prompt, [e.text for e in examples], task.max_gen_toks, task.until, max_length, batch_size)
        result |= generation_metrics(texts, examples, task.target_delimiter)
    return result
