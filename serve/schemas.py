"""Request bodies (pydantic, strict types), the OpenAI fields the transformers backend cannot
honour, and the size limits applied after parsing.

No field is dropped silently. The transformers (``hf``) backend implements the fields of
``ChatRequest`` / ``CompletionRequest``; any other field is answered by ``unsupported_fields``:
accepted when it only labels the request (``user``, ``metadata`` ...) or holds its no-op value
(``presence_penalty: 0``, ``tools: []``, ``response_format: {"type": "text"}`` ...), otherwise a
400 that names it. The vLLM path does not use these models: it validates the body with
``ray.serve.llm``'s own request models, which carry every field vLLM's server accepts
(``serve/vllm_backend.py``). trace-ray's ``/v1/triage`` body forbids unknown fields (422).
``check_*`` apply ``Limits`` to either path and raise ``ClientError``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_LOGPROBS = 20  # top_logprobs / completion logprobs, as OpenAI's and vLLM's default cap


class ClientError(Exception):
    """A problem with the request: answered with ``status`` and ``message``, never a 500."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _OpenAI(BaseModel):
    # Unknown fields are kept (``model_extra``) and judged by ``unsupported_fields``, never ignored.
    model_config = ConfigDict(extra="allow", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_OpenAI):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # a 64-bit seed, as vLLM takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    guard: bool | None = None  # trace-ray extension: check each answer against the policy

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer OpenAI name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def logprob_count(self) -> int | None:
        """How many alternatives per token the backend reports; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def logprob_count(self) -> int | None:
        return self.logprobs


def validation_message(e) -> str:
    """A pydantic ``ValidationError`` as one line naming each field (first 8)."""
    return "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()[:8])


# -- fields the transformers backend does not implement ------------------------------------------
# Labels with no effect on the answer: accepted with any value.
INFORMATIONAL = {"user", "metadata", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
                 "prompt_cache_options"}


def _no_tools(v: Any) -> bool:
    return v in (None, [], "none")


# Field → (values that change nothing, what to say when another value comes).
NO_OP: dict[str, tuple[Any, str]] = {
    "frequency_penalty": (lambda v: v in (None, 0, 0.0), "penalties are not implemented; send 0"),
    "presence_penalty": (lambda v: v in (None, 0, 0.0), "penalties are not implemented; send 0"),
    "logit_bias": (lambda v: v in (None, {}), "logit_bias is not implemented"),
    "response_format": (lambda v: v in (None, {"type": "text"}), "structured output (json_object / json_schema) "
                                                                "is not implemented; use the vllm backend"),
    "tools": (_no_tools, "tool calling is not implemented"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "tool calling is not implemented"),
    "parallel_tool_calls": (lambda v: True, ""),  # meaningless without tools, which are refused above
    "functions": (_no_tools, "function calling is not implemented"),
    "function_call": (lambda v: v in (None, "none", "auto"), "function calling is not implemented"),
    "store": (lambda v: v in (None, False), "stored completions are not implemented"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "service tiers are not implemented"),
    "modalities": (lambda v: v in (None, ["text"]), "only text output is implemented"),
    "audio": (lambda v: v is None, "audio output is not implemented"),
    "prediction": (lambda v: v is None, "predicted outputs are not implemented"),
    "reasoning_effort": (lambda v: v is None, "reasoning_effort is not implemented"),
    "verbosity": (lambda v: v is None, "verbosity is not implemented"),
    "web_search_options": (lambda v: v is None, "web search is not implemented"),
    "echo": (lambda v: v in (None, False), "echo is not implemented"),
    "suffix": (lambda v: v in (None, ""), "suffix (insertion) is not implemented"),
    "best_of": (lambda v: v in (None, 1), "best_of is not implemented; use n"),
}


def unsupported_fields(req: _OpenAI) -> None:
    """400 naming the first field this backend would otherwise have to drop."""
    for name, value in (req.model_extra or {}).items():
        if name in INFORMATIONAL:
            continue
        rule = NO_OP.get(name)
        if rule is None:
            raise ClientError(400, f"{name}: not supported by this server's transformers backend (hf); remove it, "
                                   "or serve with --backend vllm", param=name)
        ok, why = rule
        if not ok(value):
            raise ClientError(400, f"{name}: {value!r} is not supported by the transformers backend (hf): {why}",
                              param=name)


# -- triage ------------------------------------------------------------------------------------
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
    policy: str | None = None  # a served policy's name (GET /v1/policies); default: the first


# -- limits (both backends) ----------------------------------------------------------------------
def _text(where: str, s: str, limits) -> None:
    if len(s) > limits.max_text_chars:
        raise ClientError(413, f"{where} is {len(s)} characters; the limit is {limits.max_text_chars}")


def check_generation(limits, *, max_tokens: int | None, n: int, stops: list[str], texts: dict[str, str]) -> int:
    """Shared limits of a chat or completion request; returns the effective max_tokens.
    ``texts``: every prompt/message text by where it is in the body."""
    max_tokens = max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens:
        raise ClientError(422, f"max_tokens is {max_tokens}; the limit is {limits.max_tokens}")
    if n > limits.max_n:
        raise ClientError(422, f"n is {n}; the limit is {limits.max_n}")
    if len(stops) > limits.max_stop:
        raise ClientError(422, f"stop has {len(stops)} strings; the limit is {limits.max_stop}")
    for i, s in enumerate(stops):
        _text(f"stop[{i}]", s, limits)
    for where, s in texts.items():
        _text(where, s, limits)
    return max_tokens


def check_chat(req: ChatRequest, limits) -> int:
    if len(req.messages) > limits.max_messages:
        raise ClientError(413, f"messages has {len(req.messages)} entries; the limit is {limits.max_messages}")
    texts = {f"messages[{i}].content": m.text() for i, m in enumerate(req.messages)}
    return check_generation(limits, max_tokens=req.max_completion_tokens or req.max_tokens, n=req.n,
                            stops=req.stops(), texts=texts)


def check_completion(req: CompletionRequest, limits) -> int:
    prompts = req.prompts()
    if not prompts:
        raise ClientError(422, "prompt: give a string or a non-empty list of strings")
    if len(prompts) > limits.max_items:
        raise ClientError(413, f"prompt has {len(prompts)} entries; the limit is {limits.max_items}")
    texts = {f"prompt[{i}]": p for i, p in enumerate(prompts)}
    return check_generation(limits, max_tokens=req.max_tokens, n=req.n, stops=req.stops(), texts=texts)


def check_triage(items: list[TriageItem], limits) -> None:
    if len(items) > limits.max_items:
        raise ClientError(413, f"items has {len(items)} entries; the limit is {limits.max_items}")
    for i, it in enumerate(items):
        for name in ("prompt", "chosen", "rejected", "response"):
            value = getattr(it, name)
            if value is not None:
                _text(f"items[{i}].{name}", value, limits)
