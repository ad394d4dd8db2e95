"""Reading a request body safely: a byte cap, a time limit, valid UTF-8, bounded nesting, then
pydantic validation — every problem a ``ClientError`` (4xx with a message), never a 500."""

from __future__ import annotations

import asyncio
import json

from pydantic import ValidationError

from serve.schemas import ClientError, validation_message


def _check_tree(data, max_depth: int) -> None:
    """Depth of nesting and valid UTF-8 of every string (``"\\ud800"`` is valid JSON, not text)."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                raise ClientError(400, f"JSON nested deeper than {max_depth} levels")
            items = list(node.items()) if isinstance(node, dict) else [(None, v) for v in node]
            for k, v in items:
                if k is not None:
                    stack.append((k, depth))
                stack.append((v, depth + 1))
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise ClientError(400, "malformed JSON: a string holds an unpaired surrogate (not valid UTF-8)") from None


async def read_json(request, limits):
    """``request``'s body (a Starlette ``Request``) as JSON: at most ``max_body_bytes`` (also a
    chunked body without Content-Length), received within ``body_timeout_s`` (408 for a client that
    sends it slower), nested at most ``max_json_depth`` levels, valid UTF-8."""
    body = bytearray()

    async def receive():
        async for part in request.stream():
            body.extend(part)
            if len(body) > limits.max_body_bytes:
                raise ClientError(413, f"body is over {limits.max_body_bytes} bytes")

    try:
        await asyncio.wait_for(receive(), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise ClientError(408, f"the body did not arrive within {limits.body_timeout_s:g} s") from None
    if not body:
        raise ClientError(400, "empty body; expected a JSON object")
    try:
        data = json.loads(bytes(body))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ClientError(400, f"malformed JSON: {e}") from None
    except RecursionError:
        raise ClientError(400, f"JSON nested deeper than {limits.max_json_depth} levels") from None
    _check_tree(data, limits.max_json_depth)
    return data


def parse(model_cls, data, openai: bool = False):
    """Validate ``data``; 422 naming the fields. In an OpenAI body a field the server does not know
    (also inside a message) is a 400: it would be dropped otherwise."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        errs = e.errors()
        if openai and all(err["type"] == "extra_forbidden" for err in errs):
            where = ".".join(str(x) for x in errs[0]["loc"])
            raise ClientError(400, f"{where}: not supported by this server's transformers backend (hf)",
                              param=where) from None
        raise ClientError(422, validation_message(e)) from None
