"""Config dataclasses document their fields once: a field's `metadata["help"]` is its CLI flag's help.

`cli.options_from` turns a config dataclass (TrainConfig, StudyConfig, ExecutorConfig, ServeConfig)
into click options, reading each field's help from here; the classes stay free of click.
"""

from __future__ import annotations

HELP_KEY = "help"


def flag_help(text: str) -> dict:
    """The `field(metadata=...)` of a config field whose CLI flag says `text`."""
    return {HELP_KEY: text}
