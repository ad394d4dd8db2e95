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


def test_text_views_of_a_conversation():
    from trace_ray.chat import last_user_turn, stored, transcript

    assert last_user_turn(json.dumps(CONV)) == "How do I bake bread?" and last_user_turn("plain") == "plain"
    assert last_user_turn([{"role": "system", "content": "s"}]) == ""
    assert transcript(CONV) == "User: Hi there\n\nAssistant: Hello!\n\nUser: How do I bake bread?"
    assert stored(CONV) == json.dumps(CONV, ensure_ascii=False) and stored("plain") == "plain"


def test_system_message_goes_before_the_conversation(tiny_tokenizer):
    text, _ = render_prompt(tiny_tokenizer, "Hi", system="Be brief.")
    assert text == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"


def _models(tiny_model_dir):
    from conftest import SHARED

    return {"chat template": str(tiny_model_dir), "no template": str(SHARED / "models" / "fake_gpt2_lm_buddy")}


def test_trainer_scores_the_prompt_tokens_the_server_generates_from(tiny_model_dir, tmp_path):
    """A TRL conversational row → reader → triage → the trainer's batch; the same conversation sent
    to the HF serving backend as chat messages: the prompt tokens are identical, with and without a
    chat template."""
    from serve.hf_backend import HFGenerator
    from trace_ray.data.readers import iter_records
    from trace_ray.logprobs import encode_pairs
    from trace_ray.models.load import load_tokenizer
    from trace_ray.policy import load_policy
    from trace_ray.triage import triage_records

    conv = [{"role": "system", "content": "You are kind."}] + CONV
    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": conv, "chosen": [{"role": "assistant", "content": "Mix flour."}],
                                                  "rejected": [{"role": "assistant", "content": "No."}]}) + "\n")
    pol = load_policy({"name": "p", "version": 1, "rules": [{"name": "k", "kind": "keywords", "keywords": ["gun"]}]})
    (row,) = triage_records(pol, list(iter_records(tmp_path / "c.jsonl")))  # what triaged.parquet holds
    for label, spec in _models(tiny_model_dir).items():
        tok = load_tokenizer(spec)
        batch = encode_pairs(tok, [row], max_length=4096)
        on = batch["attention_mask"][0].bool() & ~batch["loss_mask"][0].bool()
        trainer = batch["input_ids"][0][on].tolist()
        server = HFGenerator(spec, {})._encode({"messages": conv, "max_tokens": 8})
        assert trainer == server, label
        assert (tok.chat_template is not None) == (label == "chat template")
        assert len(server) > 10
