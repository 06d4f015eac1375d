"""The one test on the real packaged SmolLM2-135M-Instruct: two optimizer steps on CB leave the weights alone."""

from __future__ import annotations

import json

import pytest
import torch

from softprompt.backbones.loading import DEFAULT_MODEL, load_backbone
from softprompt.io.runs import PROMPT_FILE, RUN_FILE, load_prompt
from softprompt.train.config import TrainConfig
from softprompt.train.loop import train


@pytest.mark.slow
def test_two_steps_on_smollm2_keep_the_weights(data_dir, tmp_path):
    # No skip: a missing package fails here with the pip command in the message.
    backbone = load_backbone(DEFAULT_MODEL, device="auto")
    assert backbone.hidden_size == 576 and len(backbone.tokenizer) == 49152
    before = {name: tensor.clone() for name, tensor in backbone.model.state_dict().items()}
    # fixture CB: 24 train rows -> a dev slice of 3 (one per label), 16 of the other 21 to train on:
    # 2 batches of 8 = 2 optimizer steps; then dev (3) and val (6) are scored
    config = TrainConfig(
        task="cb", num_tokens=4, batch_size=8, max_steps=2, min_dev_examples=3, max_train_examples=16, eval_batch_size=8
    )

    record = train(config, tmp_path, backbone=backbone, data_dir=data_dir, progress=False)

    assert record["data"]["train"] == 16 and record["steps"] == 2
    after = backbone.model.state_dict()
    assert [name for name in before if not torch.equal(before[name], after[name])] == []
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert json.loads((tmp_path / RUN_FILE).read_text())["status"] == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == [PROMPT_FILE, RUN_FILE]
    prompt, metadata = load_prompt(tmp_path, hidden_size=576)
    assert prompt.shape == (4, 576) and torch.isfinite(prompt).all()
    assert metadata["model"] == DEFAULT_MODEL
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in record["history"])
