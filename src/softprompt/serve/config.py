"""`softprompt serve`'s settings: one frozen dataclass, the schema of the command's flags."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from softprompt.backbones.fastpath import ATTENTION_HELP, DTYPE_HELP
from softprompt.backbones.loading import DEFAULT_MODEL, DTYPE_CHOICES
from softprompt.flags import flag_help


class TooLong(str, Enum):
    TRUNCATE = "truncate"  # drop the context's first tokens, as `softprompt evaluate` does, and say so
    REJECT = "reject"  # answer 413


@dataclass(frozen=True)
class ServeConfig:
    model: str = field(default=DEFAULT_MODEL, metadata=flag_help("Backbone: preset, local HF folder, .gguf file or hub id."))
    host: str = field(default="127.0.0.1", metadata=flag_help("Address to bind (loopback by default)."))
    port: int = field(default=8000, metadata=flag_help("Port to bind (0: any free port)."))
    max_batch: int = field(default=32, metadata=flag_help("Most rows (inputs x prompts) in one forward."))
    # 10 ms, re-tuned with `make bench-serve` (bench/results-serve.json, 2-core AMD EPYC Zen 4): against 5 ms, fp32
    # (what `auto` serves) gave 1.26x the requests/s at concurrency 8 and 1.16x at 32, the same at 1; bf16 the same
    # within the repeats' spread. --max-batch 64 bought nothing over 32 (bf16 at 10 ms: 0.78x).
    max_wait_ms: float = field(default=10.0, metadata=flag_help("Longest a request waits for others to share its forward."))
    max_queue: int = field(default=256, metadata=flag_help("Most requests in flight; past it, 503 with Retry-After."))
    api_key_file: str | None = field(default=None, metadata=flag_help("File holding the API key; then every endpoint but /health needs `Authorization: Bearer KEY`."))
    max_length: int = field(default=256, metadata=flag_help("Longest input (context + longest choice) in tokens, as in evaluate."))
    too_long: TooLong = field(default=TooLong.TRUNCATE, metadata=flag_help("An input over --max-length: truncate its start (said in the response) or reject (413)."))
    max_inputs: int = field(default=64, metadata=flag_help("Most inputs (or completion prompts) in one request."))
    max_body_bytes: int = field(default=1 << 20, metadata=flag_help("Largest request body; larger ones get 413."))
    max_tokens: int = field(default=256, metadata=flag_help("Most new tokens a completion may ask for."))
    device: str = field(default="auto", metadata=flag_help("auto, cpu, cuda or cuda:N."))
    dtype: str = field(default="auto", metadata=flag_help(DTYPE_HELP))
    attention: str = field(default="auto", metadata=flag_help(ATTENTION_HELP))
    drain_timeout_s: float = field(default=30.0, metadata=flag_help("On SIGTERM, how long to let in-flight requests finish."))

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "too_long", TooLong(self.too_long))
        except ValueError:
            raise ValueError(f"--too-long must be truncate or reject, got {self.too_long!r}") from None
        for name in ("max_batch", "max_queue", "max_length", "max_inputs", "max_body_bytes", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"--dtype {self.dtype!r} is not a dtype; use one of {', '.join(DTYPE_CHOICES)}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be between 0 and 65535, got {self.port}")
        for name in ("max_wait_ms", "drain_timeout_s"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"--{name.replace('_', '-')} must be a number >= 0, got {getattr(self, name)}")

    def api_key(self) -> str | None:
        """The key in `--api-key-file`, stripped of surrounding whitespace, or None without the flag.

        Raises:
            ValueError: the file is missing, unreadable or empty.
        """
        if self.api_key_file is None:
            return None
        try:
            key = Path(self.api_key_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--api-key-file {self.api_key_file}: cannot read it ({e})") from None
        if not key:
            raise ValueError(f"--api-key-file {self.api_key_file} is empty; put the key in it (e.g. `openssl rand -hex 32 > FILE`)")
        return key

    def binds_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: assume it reaches other machines
