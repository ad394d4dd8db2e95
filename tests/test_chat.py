"""trace_ray.chat: the one prompt → tokens function (training, evaluation, serving)."""

from __future__ import annotations

import json

from trace_ray.chat import as_messages, left_padded, prompt_ids, render_prompt

CONV = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How do I bake bread?"}]


def test_as_messages_accepts_lists_and_their_json_only():
    assert as_messages(CONV) == CONV
    assert as_messages(json.dumps(CONV)) == CONV
    assert as_messages("How do I bake bread?") is None
    assert as_messages("[{not json") is None
    assert as_messages([{"role": "user"}]) is None  # no content: not a conversation
    assert as_messages([]) is None


def test_template_renders_the_conversation_with_the_assistant_turn_open(tiny_tokenizer):
    text, special = render_prompt(tiny_tokenizer, CONV)
    assert not special
    assert text == "<|user|>\nHi there\n<|assistant|>\nHello!\n<|user|>\nHow do I bake bread?\n<|assistant|>\n"
    # a plain string is one user turn; its JSON-string form gives the same ids as the list
    assert render_prompt(tiny_tokenizer, "Hi")[0] == "<|user|>\nHi\n<|assistant|>\n"
    assert prompt_ids(tiny_tokenizer, json.dumps(CONV)) == prompt_ids(tiny_tokenizer, CONV)
    assert prompt_ids(tiny_tokenizer, CONV) == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_without_template_roles_are_spelled_out_and_strings_stay_raw(tiny_tokenizer):
    tok = tiny_tokenizer
    old = tok.chat_template
    tok.chat_template = None
    try:
        text, special = render_prompt(tok, CONV)
        assert special and text == "user: Hi there\nassistant: Hello!\nuser: How do I bake bread?\nassistant:"
        assert render_prompt(tok, "How do I") == ("How do I", True)
    finally:
        tok.chat_template = old


def test_empty_prompt_starts_from_bos_or_eos(tiny_tokenizer):
    old = tiny_tokenizer.chat_template
    tiny_tokenizer.chat_template = None
    try:
        ids = prompt_ids(tiny_tokenizer, "")
    finally:
        tiny_tokenizer.chat_template = old
    start = tiny_tokenizer.bos_token_id if tiny_tokenizer.bos_token_id is not None else tiny_tokenizer.eos_token_id
    assert ids == [start]


def test_left_padded_puts_every_last_token_in_the_last_column(tiny_tokenizer):
    ids, mask = left_padded(tiny_tokenizer, [[5, 6, 7], [8]])
    assert ids.tolist()[0] == [5, 6, 7] and ids.tolist()[1][-1] == 8
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
