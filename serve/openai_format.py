"""Building OpenAI wire-format bodies (chat.completion, text_completion, their stream chunks).

Log-probabilities arrive from the generator as entries ``{"token", "logprob", "offset", "top":
[[token, logprob], ...]}`` (``serve/hf_backend.py``) and leave in OpenAI's two shapes: chat
``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``, completions
``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`` (the sampled
token is always among a completion's ``top_logprobs``, as OpenAI documents).
"""

from __future__ import annotations

import json
import time
import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, kind: str = "invalid_request_error", code: int | str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def logprobs(kind: str, entries: list[dict] | None) -> dict | None:
    """Generator entries → the ``logprobs`` object of a chat or completion choice (None: not asked)."""
    if entries is None:
        return None
    if kind == "chat":
        return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": _bytes(e["token"]),
                             "top_logprobs": [{"token": t, "logprob": v, "bytes": _bytes(t)} for t, v in e["top"]]}
                            for e in entries]}
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{**dict(e["top"]), e["token"]: e["logprob"]} for e in entries],
            "text_offset": [e["offset"] for e in entries]}


def choice(kind: str, index: int, c: dict) -> dict:
    """A generator choice (``text``, ``finish_reason``, ``logprobs``) as a chat or completion choice."""
    if kind == "chat":
        return {"index": index, "message": {"role": "assistant", "content": c["text"]},
                "logprobs": logprobs(kind, c.get("logprobs")), "finish_reason": c["finish_reason"]}
    return {"index": index, "text": c["text"], "logprobs": logprobs(kind, c.get("logprobs")),
            "finish_reason": c["finish_reason"]}


def response(kind: str, rid: str, model: str, choices: list[dict], use: dict) -> dict:
    """``kind``: ``chat`` → ``chat.completion``; ``completion`` → ``text_completion``."""
    obj = "chat.completion" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def chunk(kind: str, rid: str, model: str, *, index: int = 0, text: str | None = None, role: bool = False,
          finish_reason: str | None = None, entries: list[dict] | None = None, use: dict | None = None,
          extra: dict | None = None) -> str:
    """One server-sent event for choice ``index``. Chat chunks carry ``delta``; completion chunks
    carry ``text``. A usage-only chunk (``stream_options.include_usage``) has empty ``choices``."""
    lp = logprobs(kind, entries) if entries else None
    if kind == "chat":
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        ch = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        ch = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish_reason}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": [] if use is not None else [ch]}
    if use is not None:
        body["usage"] = use
    if extra:
        body.update(extra)
    return sse(body)


def sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


DONE = sse("[DONE]")
