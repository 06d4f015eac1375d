"""What a soft prompt says: the vocabulary tokens nearest to each prompt row, by cosine similarity.

For each row of a `[P, H]` prompt, the top-k tokens of the vocabulary (embedded through
`get_input_embeddings()`, so scaled embeddings such as Gemma's are compared as the model sees them),
whether the nearest one is still the init token at that position ("persisted"), and the Unicode
script of each token, so drift into other languages shows.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from softprompt.core.prompt import InitMethod
from softprompt.io.runs import load_prompt, read_run
from softprompt.tasks.registry import get_task

# First word of a Unicode character name -> script, where the two differ.
SCRIPT_ALIASES = {"CJK": "Han", "IDEOGRAPHIC": "Han", "KANGXI": "Han", "FULLWIDTH": "Latin", "HALFWIDTH": "Katakana"}
COMMON = "Common"  # digits, punctuation, spaces, symbols
PARTIAL_BYTES = "Bytes"  # a byte-level token that is not a whole UTF-8 character on its own


@dataclass(frozen=True)
class Neighbour:
    token_id: int
    token: str  # readable: spaces shown as ␣, newlines escaped
    script: str
    cosine: float


@dataclass(frozen=True)
class RowReading:
    position: int
    neighbours: tuple[Neighbour, ...]  # best first
    init_token: str | None  # the text-init token at this position, None for other inits
    persisted: bool  # the nearest token is the init token at this position


def nearest_tokens(prompt: Tensor, vocab_embeddings: Tensor, k: int = 3) -> tuple[Tensor, Tensor]:
    """Top-k vocabulary rows by cosine similarity to each prompt row.

    Args:
        prompt: `[P, H]`.
        vocab_embeddings: `[V, H]` (row i is token id i, or an id offset the caller adds).
        k: neighbours per row.

    Returns:
        (cosines `[P, k]`, indices `[P, k]`), best first.

    Raises:
        ValueError: hidden sizes differ or k is not in 1..V.
    """
    if prompt.shape[-1] != vocab_embeddings.shape[-1]:
        raise ValueError(
            f"prompt hidden size {prompt.shape[-1]} != vocabulary hidden size {vocab_embeddings.shape[-1]}; "
            "interpret a prompt with the model it was trained on"
        )
    if not 1 <= k <= vocab_embeddings.shape[0]:
        raise ValueError(f"--top-k must be between 1 and the vocabulary size {vocab_embeddings.shape[0]}, got {k}")
    a = torch.nn.functional.normalize(prompt.float(), dim=-1)
    b = torch.nn.functional.normalize(vocab_embeddings.float(), dim=-1)
    return (a @ b.T).topk(k, dim=-1)  # [P, V] -> [P, k]


@torch.no_grad()
def nearest_tokens_in_model(model: PreTrainedModel, prompt: Tensor, k: int = 3, chunk_size: int = 16384) -> tuple[Tensor, Tensor]:
    """`nearest_tokens` against the model's whole input-embedding table, `chunk_size` ids at a time.

    Only one `[chunk, H]` slice of embeddings exists at once (Gemma's 262k x 640 table scaled by
    sqrt(H) would otherwise be a second 670 MB copy).

    Returns:
        (cosines `[P, k]`, token ids `[P, k]`), best first.
    """
    embedding = model.get_input_embeddings()
    vocab_size, device = embedding.num_embeddings, embedding.weight.device
    best_cos = torch.full((prompt.shape[0], k), float("-inf"))
    best_ids = torch.zeros((prompt.shape[0], k), dtype=torch.long)
    for start in range(0, vocab_size, chunk_size):
        ids = torch.arange(start, min(start + chunk_size, vocab_size), device=device)
        cos, idx = nearest_tokens(prompt.cpu(), embedding(ids).float().cpu(), min(k, len(ids)))
        merged_cos = torch.cat([best_cos, cos], dim=1)
        merged_ids = torch.cat([best_ids, idx + start], dim=1)
        best_cos, order = merged_cos.topk(k, dim=1)
        best_ids = merged_ids.gather(1, order)
    return best_cos, best_ids


def init_token_ids(tokenizer: PreTrainedTokenizerBase, text: str, num_tokens: int) -> list[int]:
    """The token id at each prompt position after the text init (repeated or truncated, as `from_embedded_text`)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the init text has no tokens")
    return (ids * -(-num_tokens // len(ids)))[:num_tokens]


def script_of(text: str) -> str:
    """The Unicode script of a token's letters (`Latin`, `Arabic`, `Han`, ...); `Common` for none.

    Letters and combining marks vote by the first word of their Unicode name; the most frequent
    script wins. A lone U+FFFD (a partial UTF-8 byte sequence decoded) is `Bytes`.
    """
    votes: Counter[str] = Counter()
    for char in text:
        if unicodedata.category(char)[0] not in "LM":
            continue
        first = unicodedata.name(char, "UNKNOWN").split()[0]
        if first in ("COMBINING", "MODIFIER", "UNKNOWN"):
            continue
        votes[SCRIPT_ALIASES.get(first, first.title())] += 1
    if votes:
        return votes.most_common(1)[0][0]
    return PARTIAL_BYTES if "\ufffd" in text else COMMON


def readable(text: str) -> str:
    """A token as printable text: spaces as ␣, newlines/tabs escaped, other control characters as \\xNN."""
    escapes = {" ": "␣", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    out = []
    for char in text:
        if char in escapes:
            out.append(escapes[char])
        elif unicodedata.category(char) == "Cc":
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out) or "∅"


def read_rows(cosines: Tensor, token_ids: Tensor, tokenizer: PreTrainedTokenizerBase, init_ids: list[int] | None) -> list[RowReading]:
    """Rows of `nearest_tokens` output as readable records, with the persisted flag."""
    rows = []
    for p in range(token_ids.shape[0]):
        neighbours = tuple(
            Neighbour(int(t), readable(tokenizer.decode([int(t)])), script_of(tokenizer.decode([int(t)])), round(float(c), 4))
            for c, t in zip(cosines[p], token_ids[p])
        )
        init_id = None if init_ids is None else init_ids[p]
        init_token = None if init_id is None else readable(tokenizer.decode([init_id]))
        rows.append(RowReading(p, neighbours, init_token, init_id is not None and int(token_ids[p, 0]) == init_id))
    return rows


def run_init_ids(record: dict, tokenizer: PreTrainedTokenizerBase, num_tokens: int) -> list[int] | None:
    """The token each prompt row started on (run.json's `init_ids`; runs from before it was recorded:
    the text init's tokens), or None for a random init (no token to persist)."""
    if "init_ids" in record:
        return record["init_ids"]
    config = record.get("config", {})
    if config.get("init", InitMethod.TEXT.value) != InitMethod.TEXT.value:
        return None
    text = config.get("init_text") or get_task(config.get("task") or record["task"]).init_text
    return init_token_ids(tokenizer, text, num_tokens)


def interpret_prompt(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: Tensor, init_ids: list[int] | None, k: int = 3) -> list[RowReading]:
    """Nearest tokens, scripts and persisted flags for every row of a `[P, H]` prompt."""
    cosines, ids = nearest_tokens_in_model(model, prompt, k)
    return read_rows(cosines, ids, tokenizer, init_ids)


def interpret_run(run_dir: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, k: int = 3) -> list[RowReading]:
    """`interpret_prompt` for a saved run folder (its prompt and its init text from run.json).

    Raises:
        FileNotFoundError, PromptFileError: missing or damaged run files.
    """
    record = read_run(run_dir)
    prompt, _ = load_prompt(run_dir, hidden_size=model.get_input_embeddings().embedding_dim)
    return interpret_prompt(model, tokenizer, prompt, run_init_ids(record, tokenizer, prompt.shape[0]), k)


def rows_to_json(rows: list[RowReading]) -> list[dict]:
    return [asdict(row) for row in rows]


def format_table(rows: list[RowReading]) -> str:
    """A plain-text table: position, init token, persisted mark (*), then `token [Script] cosine` per neighbour."""
    lines = [f"{'pos':>3}  {'init':<14} {'':1}  nearest tokens (script, cosine)"]
    for row in rows:
        cells = "   ".join(f"{n.token} [{n.script}] {n.cosine:.3f}" for n in row.neighbours)
        lines.append(f"{row.position:>3}  {(row.init_token or '-'):<14} {'*' if row.persisted else ' '}  {cells}")
    persisted = sum(row.persisted for row in rows)
    lines.append(f"* persisted: the nearest token is still the init token ({persisted}/{len(rows)} rows)")
    return "\n".join(lines)
