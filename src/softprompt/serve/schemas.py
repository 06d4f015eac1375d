"""What goes over the wire: pydantic request bodies and the JSON error body.

Every error is a JSON body `{"error": {"message", "type", "field"}}` with a 4xx status naming the
request field at fault; only a bug gives a 500.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """A 4xx answer: status, message (with the fix) and the request field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.kind, self.headers = status, message, field, kind, headers


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | list[str] = Field(description="A prompt name, or several for an ensemble.")
    inputs: list[dict[str, Any]] = Field(min_length=1, description="Task fields, or {text, choices}.")


class TextInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    choices: list[str] = Field(min_length=1)


class CompletionRequest(BaseModel):
    """OpenAI's `/v1/completions` body, the part lm-evaluation-harness's `local-completions` sends."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(default=16, ge=0)
    temperature: float = Field(default=1.0, ge=0, le=10)
    seed: int | None = None
    stop: str | list[str] | None = None
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    n: Literal[1] = 1
    stream: Literal[False] = False
    top_p: Literal[1, 1.0] = 1.0
    user: str | None = None


def field_path(loc: tuple) -> str:
    """`("body", "inputs", 0, "choices")` -> `inputs[0].choices`."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def error_response(status: int, message: str, field: str | None, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "field": field}}, status, headers=headers)
