"""Request bodies (pydantic, strict types) and the size limits applied after parsing.

OpenAI bodies ignore fields they do not use (clients send many: ``user``, ``seed``,
``presence_penalty`` ...); trace-ray's own ``/v1/triage`` body forbids unknown fields, so a typo
is a 422 rather than a silent default. ``check_*`` apply ``Limits`` and raise ``ClientError``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ClientError(Exception):
    """A problem with the request: answered with ``status`` and ``message``, never a 500."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class _OpenAI(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_OpenAI):
    type: Literal["text"]
    text: str


class ChatMessage(_OpenAI):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_OpenAI):
    include_usage: bool = False


class _Sampling(_OpenAI):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    guard: bool | None = None  # trace-ray extension: check each answer against the policy

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer OpenAI name of max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TriageItem(BaseModel):
    """A pair (``chosen`` + ``rejected``) or a single ``response``; ``meta`` as the readers make it
    (for a pair ``{"chosen": {...}, "rejected": {...}}``, for a response that response's own)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str
    chosen: str | None = None
    rejected: str | None = None
    response: str | None = None
    meta: dict | None = None
    id: str | None = None

    @model_validator(mode="after")
    def _one_shape(self):
        pair = self.chosen is not None or self.rejected is not None
        if pair and (self.chosen is None or self.rejected is None):
            raise ValueError("a pair needs both 'chosen' and 'rejected'")
        if pair == (self.response is not None):
            raise ValueError("give either 'chosen' and 'rejected' (a pair) or 'response' (one answer)")
        return self

    @property
    def is_pair(self) -> bool:
        return self.response is None


class TriageBatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    items: list[TriageItem] = Field(min_length=1)


# -- limits ------------------------------------------------------------------------------------
def _text(where: str, s: str, limits) -> None:
    if len(s) > limits.max_text_chars:
        raise ClientError(413, f"{where} is {len(s)} characters; the limit is {limits.max_text_chars}")


def check_sampling(req: _Sampling, limits) -> int:
    """Apply the shared limits; returns the effective max_tokens."""
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens:
        raise ClientError(422, f"max_tokens is {max_tokens}; the limit is {limits.max_tokens}")
    if req.n > limits.max_n:
        raise ClientError(422, f"n is {req.n}; the limit is {limits.max_n}")
    stops = req.stops()
    if len(stops) > limits.max_stop:
        raise ClientError(422, f"stop has {len(stops)} strings; the limit is {limits.max_stop}")
    for i, s in enumerate(stops):
        _text(f"stop[{i}]", s, limits)
    if req.stream and req.n != 1:
        raise ClientError(422, "stream: true supports n = 1 only")
    return max_tokens


def check_chat(req: ChatRequest, limits) -> int:
    if len(req.messages) > limits.max_messages:
        raise ClientError(413, f"messages has {len(req.messages)} entries; the limit is {limits.max_messages}")
    for i, m in enumerate(req.messages):
        _text(f"messages[{i}].content", m.text(), limits)
    return check_sampling(req, limits)


def check_completion(req: CompletionRequest, limits) -> int:
    prompts = req.prompts()
    if not prompts:
        raise ClientError(422, "prompt: give a string or a non-empty list of strings")
    if len(prompts) > limits.max_items:
        raise ClientError(413, f"prompt has {len(prompts)} entries; the limit is {limits.max_items}")
    if req.stream and len(prompts) != 1:
        raise ClientError(422, "stream: true supports a single prompt only")
    for i, p in enumerate(prompts):
        _text(f"prompt[{i}]", p, limits)
    return check_sampling(req, limits)


def check_triage(items: list[TriageItem], limits) -> None:
    if len(items) > limits.max_items:
        raise ClientError(413, f"items has {len(items)} entries; the limit is {limits.max_items}")
    for i, it in enumerate(items):
        for name in ("prompt", "chosen", "rejected", "response"):
            value = getattr(it, name)
            if value is not None:
                _text(f"items[{i}].{name}", value, limits)
