"""One raw row → one canonical record, per input format (the parsing behind ``trace_ray.data.readers``).

Formats:
- ``pairs`` — an explicit ``prompt`` plus ``chosen`` / ``rejected``. TRL's *standard* format
  (three strings) and *conversational* format (``prompt`` a list of messages, ``chosen`` /
  ``rejected`` lists holding one assistant message) both read here. A response list that repeats
  the prompt's turns before its reply (UltraFeedback-binarized as HuggingFaceH4 ships it) has
  them stripped; what is left must be exactly one assistant message.
- ``implicit`` — TRL's *implicit prompt* format: only ``chosen`` / ``rejected``, each a whole
  conversation. The opening messages both share are the prompt; what follows in each must be one
  assistant message (else the row is unresolved: no shared opening turn, or the conversations
  diverge before their last assistant turn).
- ``pku`` — PKU-SafeRLHF's own columns (``pku_chosen`` picks y_w: ``better``, ``safer`` or the
  TRACE authors' rule). Each response's labels go to ``meta["chosen"]`` / ``meta["rejected"]``.
- ``hh`` — Anthropic HH-RLHF transcripts: the prefix up to and including the last shared
  ``"\\n\\nAssistant:"`` is the prompt, the rest of each transcript (stripped) the response.

A conversation prompt is stored as the JSON text of its messages (``trace_ray.chat.stored``) in
the ``prompt`` string column; a plain prompt stays a plain string. Column mapping (``keys``:
``{"prompt": "question", ...}``) renames a row's columns before any of this.

A row that cannot become a record raises ``BadRow`` inside; ``to_record`` turns that into a record
with ``_error`` (never raises), whose texts keep what the row held.
"""

from __future__ import annotations

import json
import os
from typing import Any

from trace_ray.chat import as_messages, stored
from trace_ray.data.schema import row_id

FORMATS = ("auto", "pairs", "implicit", "pku", "hh")
PKU_CHOSEN = ("authors", "better", "safer")
COLUMNS = ("prompt", "chosen", "rejected")
KEY_FLAGS = {"prompt": "--prompt-key", "chosen": "--chosen-key", "rejected": "--rejected-key"}
HH_MARKER = "\n\nAssistant:"


class BadRow(ValueError):
    """A row that cannot become a canonical record; the message is the ``_error`` reason (no
    row-specific text before the first ``": "``, so reasons can be counted by kind)."""


def column_keys(prompt_key: str | None = None, chosen_key: str | None = None,
                rejected_key: str | None = None) -> dict[str, str]:
    """``{canonical column: the file's column}`` for the columns that are named differently."""
    given = {"prompt": prompt_key, "chosen": chosen_key, "rejected": rejected_key}
    for name, v in given.items():
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise ValueError(f"{KEY_FLAGS[name]}: expected a column name, got {v!r}")
    return {k: v for k, v in given.items() if v and v != k}


def map_columns(obj: dict, keys: dict[str, str] | None, strict: bool = True) -> dict:
    """The row with its columns renamed to the canonical ones; a mapped column that the row lacks
    is a ``BadRow`` naming the flag (``strict=False``: left as it is, for format detection)."""
    if not keys:
        return obj
    out = dict(obj)
    for canon, src in keys.items():
        if src in out:
            out[canon] = out.pop(src)
        elif strict:
            raise BadRow(f"missing field {src!r} ({KEY_FLAGS[canon]})")
    return out


def format_of(obj: dict) -> str | None:
    """The format a row's columns say, or None."""
    keys = set(obj)
    if {"response_0", "response_1"} <= keys:
        return "pku"
    if {"chosen", "rejected"} <= keys:
        if "prompt" in keys:
            return "pairs"
        if isinstance(obj["chosen"], list):
            return "implicit"
        if "Assistant:" in str(obj.get("chosen")):
            return "hh"
    return None


# ---------------------------------------------------------------------------------------------
# fields


def _text(obj: dict, key: str, response: bool = False) -> str:
    if key not in obj or obj[key] is None:
        raise BadRow(f"missing field {key!r}")
    v = obj[key]
    if not isinstance(v, str):
        raise BadRow(f"field {key!r} is not a string ({type(v).__name__})")
    if response and not v.strip():
        raise BadRow(f"empty response: {key!r}")
    return v


def _messages(value: Any, key: str) -> list[dict]:
    """A list of ``{"role", "content"}`` messages with text content, checked."""
    if not value:
        raise BadRow(f"field {key!r} is an empty list")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise BadRow(f"field {key!r} holds an item that is not a message with 'role' and 'content'")
        if not isinstance(m["content"], str):
            raise BadRow(f"field {key!r} holds a message whose content is not text ({type(m['content']).__name__})")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _reply(msgs: list[dict], key: str, after: str) -> str:
    """The text of the one assistant message that should follow the prompt."""
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in msgs) or "nothing"
        raise BadRow(f"{key!r} does not hold one assistant reply after {after}: {len(msgs)} message(s) follow ({roles})")
    if not msgs[0]["content"].strip():
        raise BadRow(f"empty response: {key!r}")
    return msgs[0]["content"]


def _meta(obj: dict, used: tuple[str, ...]) -> dict:
    """The row's own ``meta`` (a dict or its JSON) plus every other column under ``fields``."""
    meta = obj.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            meta = {"raw": meta}
    meta = dict(meta) if isinstance(meta, dict) else {}
    extra = {k: v for k, v in obj.items() if k not in used + ("id", "meta")}
    if extra:
        meta.setdefault("fields", extra)
    return meta


def _given_id(obj: dict) -> str | None:
    rid = obj.get("id")
    return str(rid) if rid not in (None, "") else None


# ---------------------------------------------------------------------------------------------
# formats


def _pairs(obj: dict, pku_chosen: str) -> dict:
    prompt = obj.get("prompt")
    if prompt is None:
        raise BadRow("missing field 'prompt'")
    if isinstance(prompt, list):
        lead = _messages(prompt, "prompt")
    elif isinstance(prompt, str):
        lead = as_messages(prompt) or [{"role": "user", "content": prompt}]
    else:
        raise BadRow(f"field 'prompt' is not a string or a list of messages ({type(prompt).__name__})")
    texts = []
    for key in ("chosen", "rejected"):
        v = obj.get(key)
        if isinstance(v, list):
            msgs = _messages(v, key)
            if msgs[: len(lead)] == lead:  # the response repeats the prompt's turns: strip them
                msgs = msgs[len(lead):]
            texts.append(_reply(msgs, key, "the prompt"))
        elif v is None or isinstance(v, str):
            texts.append(_text(obj, key, response=True))
        else:
            raise BadRow(f"field {key!r} is not a string or a list of messages ({type(v).__name__})")
    return _record(stored(prompt), texts[0], texts[1], _meta(obj, COLUMNS), _given_id(obj))


def _implicit(obj: dict, pku_chosen: str) -> dict:
    convs = []
    for key in ("chosen", "rejected"):
        v = obj.get(key)
        if v is None:
            raise BadRow(f"missing field {key!r}")
        if not isinstance(v, list):
            raise BadRow(f"field {key!r} is not a list of messages ({type(v).__name__}); the implicit-prompt "
                         "format needs whole conversations")
        convs.append(_messages(v, key))
    c, r = convs
    k = 0
    while k < min(len(c), len(r)) and c[k] == r[k]:
        k += 1
    if k == 0:
        raise BadRow("chosen and rejected share no opening turn (implicit prompt)")
    if c == r:
        raise BadRow("chosen and rejected are the same conversation")
    chosen = _reply(c[k:], "chosen", "the shared opening turns")
    rejected = _reply(r[k:], "rejected", "the shared opening turns")
    return _record(stored(c[:k]), chosen, rejected, _meta(obj, COLUMNS), _given_id(obj))


def _pku_response(obj: dict, i: int) -> dict:
    cats = obj.get(f"response_{i}_harm_category")
    m: dict = {"response_id": i, "is_safe": obj.get(f"is_response_{i}_safe")}
    if isinstance(cats, dict):
        m["harm_category"] = [k for k, v in cats.items() if v]
    sev = obj.get(f"response_{i}_severity_level")
    if sev is not None:
        m["severity"] = sev
    if f"response_{i}_source" in obj:
        m["source"] = obj[f"response_{i}_source"]
    return m


def _pku(obj: dict, chosen_by: str) -> dict:
    prompt = _text(obj, "prompt")
    resp = [_text(obj, "response_0", True), _text(obj, "response_1", True)]
    safe = []
    for i in (0, 1):
        s = obj.get(f"is_response_{i}_safe")
        if not isinstance(s, bool):
            raise BadRow(f"missing field 'is_response_{i}_safe'")
        safe.append(s)

    def rid(key: str) -> int:
        v = obj.get(key)
        if v not in (0, 1) or isinstance(v, bool):
            raise BadRow(f"missing field {key!r} (0 or 1)")
        return v

    if chosen_by == "better":
        c = rid("better_response_id")
    elif chosen_by == "safer":
        c = rid("safer_response_id")
    else:  # TRACE authors: the safe one if exactly one is safe, else the safer one
        c = (0 if safe[0] else 1) if safe[0] != safe[1] else rid("safer_response_id")
    meta = {
        "source": "pku",
        "chosen_by": chosen_by,
        "chosen": _pku_response(obj, c),
        "rejected": _pku_response(obj, 1 - c),
        "better_response_id": obj.get("better_response_id"),
        "safer_response_id": obj.get("safer_response_id"),
        "prompt_source": obj.get("prompt_source"),
    }
    return _record(prompt, resp[c], resp[1 - c], meta)


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """HH transcripts → (prompt transcript, chosen response, rejected response)."""
    common = os.path.commonprefix([chosen, rejected])
    idx = common.rfind(HH_MARKER)
    if idx < 0:
        raise BadRow("chosen and rejected share no '\\n\\nAssistant:' turn")
    cut = idx + len(HH_MARKER)
    return chosen[:cut], chosen[cut:].strip(), rejected[cut:].strip()


def hh_messages(prompt: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:"`` → chat messages."""
    out = []
    for chunk in prompt.split("\n\n"):
        for tag, role in (("Human:", "user"), ("Assistant:", "assistant")):
            if chunk.startswith(tag):
                out.append({"role": role, "content": chunk[len(tag):].strip()})
                break
        else:
            if out and chunk:  # a paragraph break inside a turn
                out[-1]["content"] += "\n\n" + chunk
    if out and out[-1]["role"] == "assistant" and not out[-1]["content"]:
        out.pop()
    return out


def _hh(obj: dict, pku_chosen: str) -> dict:
    prompt, chosen, rejected = split_hh(_text(obj, "chosen"), _text(obj, "rejected"))
    if not chosen:
        raise BadRow("empty response: 'chosen'")
    if not rejected:
        raise BadRow("empty response: 'rejected'")
    msgs = hh_messages(prompt)
    return _record(stored(msgs) if msgs else prompt, chosen, rejected, {"source": "hh"})


CONVERTERS = {"pairs": _pairs, "implicit": _implicit, "pku": _pku, "hh": _hh}


def _record(prompt, chosen, rejected, meta, rid=None, error=None) -> dict:
    return {
        "id": rid or row_id(prompt, chosen, rejected),
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "meta": json.dumps(meta, ensure_ascii=False, default=str),
        "_error": error,
    }


def _as_text(v: Any) -> str:
    """What an unresolved row keeps of a field: text as it is, anything else as JSON."""
    if v is None:
        return ""
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)


def to_record(obj: dict | None, fmt: str, loc: str, error: str | None = None, pku_chosen: str = "better",
              keys: dict[str, str] | None = None) -> dict:
    """One raw row → a canonical record; a bad row → a record with ``_error`` (never raises)."""
    if error is None:
        try:
            return CONVERTERS[fmt](map_columns(obj, keys), pku_chosen)
        except BadRow as e:
            error = str(e)
    texts = []
    mapped = map_columns(obj, keys, strict=False) if isinstance(obj, dict) else {}
    for key in COLUMNS:
        texts.append(_as_text(mapped.get(key)))
    # the location is part of the id, so two broken lines never collide
    rid = row_id(loc, texts[0], "\x1f".join(texts[1:]))
    return _record(*texts, {"source": {"location": loc}}, rid, f"{loc}: {error}")
