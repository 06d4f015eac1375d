"""The naive references every equality test compares with: one plain full forward over `[prompt; input]`.

No cache, no selected positions, no shared contexts: the model's own `forward(inputs_embeds=...)`
and its full `.logits`, so the only thing these share with softprompt is the model.
"""

from __future__ import annotations

import torch


def full_logits(model, prompt: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`model(inputs_embeds=[prompt; input]).logits` for a right-padded batch: `[B, P+T, V]` in fp32.

    `prompt` is `[P, H]` (shared), `[B, P, H]` (one per row) or None.
    """
    embeds = model.get_input_embeddings()(input_ids)  # [B, T, H]
    mask = attention_mask
    if prompt is not None:
        prompts = prompt.expand(input_ids.shape[0], -1, -1) if prompt.dim() == 2 else prompt
        embeds = torch.cat([prompts.to(embeds.dtype), embeds], dim=1)
        mask = torch.cat([attention_mask.new_ones(prompts.shape[:2]), attention_mask], dim=1)
    return model(inputs_embeds=embeds, attention_mask=mask).logits.float()


def naive_logprobs(model, prompt: torch.Tensor | None, items) -> torch.Tensor:
    """One unpadded `[prompt; context + choice]` forward per choice, full logits: `[E, C]`, -inf padding."""
    out = torch.full((len(items), max(len(i.choices) for i in items)), float("-inf"))
    for e, item in enumerate(items):
        for c, choice in enumerate(item.choices):
            ids = torch.tensor([item.context + choice])
            with torch.no_grad():
                logprobs = torch.log_softmax(full_logits(model, prompt, ids, torch.ones_like(ids))[0], -1)
            at = torch.arange(len(choice)) + (0 if prompt is None else prompt.shape[-2]) + len(item.context) - 1
            out[e, c] = logprobs[at, torch.tensor(choice)].sum()
    return out


def greedy_continuation(model, prompt: torch.Tensor | None, ids: list[int], max_new_tokens: int, eos_token_id: int | None = None):
    """Greedy decoding by a full forward over `[prompt; ids + new]` per step (argmax of the last logits).

    Returns:
        the new token ids and their log-probabilities.
    """
    ids, new, logprobs = list(ids), [], []
    for _ in range(max_new_tokens):
        x = torch.tensor([ids])
        with torch.no_grad():
            last = torch.log_softmax(full_logits(model, prompt, x, torch.ones_like(x))[0, -1], -1)
        token = int(last.argmax())
        ids.append(token)
        new.append(token)
        logprobs.append(float(last[token]))
        if token == eos_token_id:
            break
    return new, logprobs
