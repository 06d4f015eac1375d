"""FFN activation probes: which neurons of each decoder layer fire on inputs run after a prompt (the ON measure).

Read by forward pre-hooks on each layer's FFN output projection around the one forward-with-prompt
(`core.forward.logits_at`), not by a copy of the forward.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedModel

from softprompt.core.forward import logits_at, prompt_keys_values


# The FFN's output projection in each decoder layer (Llama/Gemma/Mistral, GPT-2, BLOOM, OPT/Phi):
# its input `[B, T, I]` is the layer's FFN activation, read by a hook rather than a copy of the forward.
FFN_OUTPUT_PROJECTIONS = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2")


def ffn_output_projections(model: PreTrainedModel) -> list[torch.nn.Module]:
    """Each decoder layer's FFN output projection, in layer order.

    Raises:
        ValueError: the architecture names it otherwise (the message lists the names looked for).
    """
    found = [module for name, module in model.named_modules() if name.endswith(FFN_OUTPUT_PROJECTIONS)]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no FFN output projection named {', '.join(FFN_OUTPUT_PROJECTIONS)}; "
            "add its module name to softprompt.analysis.ffn_probes.FFN_OUTPUT_PROJECTIONS"
        )
    return found


@torch.no_grad()
def ffn_activation_rates(model: PreTrainedModel, prompt: Tensor | None, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """How often each FFN neuron is active (> 0) on the input tokens of a batch run after `prompt`.

    The batch goes through `logits_at` (the one forward); forward pre-hooks on each layer's FFN
    output projection count, per neuron, the real (unpadded) input tokens where its activation is
    positive. The prompt's own positions are not counted: in a causal model they do not see the
    input, so they would be the same for every probe.

    Args:
        prompt: `[P, H]` or None; input_ids, attention_mask: `[B, T]`, right-padded.

    Returns:
        `[L, I]` rates in [0, 1] (L layers, I FFN neurons per layer), fp32 on CPU.
    """
    cache = None if prompt is None else prompt_keys_values(model, prompt)  # before the hooks: prompt positions uncounted
    real = attention_mask.bool()  # [B, T]
    counts: list[Tensor] = []
    record = lambda module, args: counts.append((args[0] > 0)[real].sum(0).float().cpu())  # noqa: E731  [I] per layer
    handles = [module.register_forward_pre_hook(record) for module in ffn_output_projections(model)]
    try:
        first = input_ids.new_zeros(1)
        logits_at(model, prompt, input_ids, attention_mask, first, first, prompt_cache=cache)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(counts) / real.sum().cpu()
