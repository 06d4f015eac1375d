"""Re-train the demo's copa-s0 (auto) on an idle machine: its wall time beside the fp32 twin's, and its prompt bit for bit."""
import json, sys
from pathlib import Path
from safetensors.torch import load_file
from softprompt.study.config import StudyConfig
from softprompt.train.loop import train
config = StudyConfig.from_toml("studies/quick.toml").train_config("copa", 0)
out = Path("/work/twins/copa-s0-auto-idle")
record = train(config, out, data_dir="/work/shared/data/superglue", progress=False, resume=(out / "run.json").is_file())
a, b = load_file(out / "prompt.safetensors"), load_file("/work/demo/runs/quick/runs/copa-s0/prompt.safetensors")
print(json.dumps({"wall_s": record["wall_s"], "val": record["val"]["accuracy"], "tokens_per_s": [h["tokens_per_s"] for h in record["history"]],
                  "bit_identical_to_demo": all(k in b and a[k].equal(b[k]) for k in a)}))
