"""Building OpenAI wire-format bodies (chat.completion, text_completion, their stream chunks)."""

from __future__ import annotations

import json
import time
import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, kind: str = "invalid_request_error", code: int | str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def chat_choice(index: int, text: str, finish_reason: str) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": None, "finish_reason": finish_reason}


def completion_choice(index: int, text: str, finish_reason: str) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def response(kind: str, rid: str, model: str, choices: list[dict], use: dict) -> dict:
    """``kind``: ``chat`` → ``chat.completion``; ``completion`` → ``text_completion``."""
    obj = "chat.completion" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def chunk(kind: str, rid: str, model: str, *, text: str | None = None, role: bool = False,
          finish_reason: str | None = None, use: dict | None = None, extra: dict | None = None) -> str:
    """One server-sent event. Chat chunks carry ``delta``; completion chunks carry ``text``.
    A usage-only chunk (``stream_options.include_usage``) has empty ``choices``."""
    if kind == "chat":
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": [] if use is not None else [choice]}
    if use is not None:
        body["usage"] = use
    if extra:
        body.update(extra)
    return sse(body)


def sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


DONE = sse("[DONE]")
