"""The one way a prompt becomes the tokens a model reads: training, reference and impact passes,
evaluation, generation and serving all call :func:`prompt_ids`, so the prompt the trainer scores
is token for token the prompt the server generates from.

A prompt is a plain string or a conversation: a list of ``{"role", "content"}`` messages (or the
JSON text of one, as conversations are stored in Parquet string columns).

- The tokenizer has a chat template: the conversation (a plain string is one user turn) goes
  through ``apply_chat_template(..., add_generation_prompt=True)``; the text is tokenized without
  adding special tokens (the template writes them).
- No chat template: a conversation is rendered as ``"role: content\\n"`` per message followed by
  ``"assistant:"``; a plain string is used as it is (a completion prompt). The text is tokenized
  with the tokenizer's own special tokens (e.g. a BOS).
- ``system``: an optional system message put before the conversation (a plain string then
  becomes a user turn), e.g. the corrected-response pass's policy instructions.

Text views of a prompt for readers that are not tokenizers: :func:`last_user_turn` (what rule
oracles read as "the prompt"), :func:`transcript` (what an LLM judge is shown), :func:`stored`
(a conversation as it is kept in a Parquet string column).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

ROLES = ("system", "user", "assistant", "tool")


def as_messages(prompt: Any) -> list[dict] | None:
    """``prompt`` as chat messages if it is a conversation (a list, or the JSON text of one), else None."""
    msgs = prompt
    if isinstance(prompt, str):
        if not prompt.lstrip().startswith("[{"):
            return None
        try:
            msgs = json.loads(prompt)
        except ValueError:
            return None
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    return None


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def stored(prompt: Any) -> str:
    """The form a prompt is stored in (the canonical ``prompt`` column): a conversation as the JSON
    text of its messages, a plain string as it is."""
    msgs = as_messages(prompt)
    if msgs is None:
        return prompt if isinstance(prompt, str) else str(prompt)
    return json.dumps(msgs, ensure_ascii=False)


def last_user_turn(prompt: Any) -> str:
    """The text of the conversation's last user message (``""`` if it has none); a plain string
    as it is. What rule oracles read as the prompt (``target: prompt``, callables)."""
    msgs = as_messages(prompt)
    if msgs is None:
        return prompt if isinstance(prompt, str) else str(prompt)
    return next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")


def transcript(prompt: Any) -> str:
    """The whole conversation as readable text (``"User: ...\\n\\nAssistant: ..."``), for an LLM
    judge's template; a plain string as it is."""
    msgs = as_messages(prompt)
    if msgs is None:
        return prompt if isinstance(prompt, str) else str(prompt)
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in msgs)


def render_prompt(tokenizer, prompt: Any, system: str | None = None) -> tuple[str, bool]:
    """``(text, add_special_tokens)``: what :func:`prompt_ids` tokenizes (see the module docstring)."""
    msgs = as_messages(prompt)
    if system:
        msgs = [{"role": "system", "content": system}] + (msgs or [{"role": "user", "content": str(prompt)}])
    if has_template(tokenizer):
        msgs = msgs or [{"role": "user", "content": str(prompt)}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), False
    if msgs:
        return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:", True
    return str(prompt), True


def prompt_ids(tokenizer, prompt: Any, system: str | None = None) -> list[int]:
    """Prompt token ids, never empty: a prompt that encodes to nothing becomes ``[bos]`` (or
    ``[eos]``), since the first response token needs a position to be predicted from."""
    text, special = render_prompt(tokenizer, prompt, system)
    ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("prompt: empty prompt and the tokenizer has no bos/eos token to start from")
        ids = [start]
    return ids


def left_padded(tokenizer, rows: Sequence[Sequence[int]]):
    """Left-padded ``(input_ids, attention_mask)`` ``[B, T]`` long tensors of token id rows (for
    batched generation: every row's last prompt token sits in the last column)."""
    import torch

    T = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, T - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, T - len(r):] = 1
    return ids, mask
