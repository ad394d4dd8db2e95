"""The real ``trace-ray serve`` command over HTTP on 127.0.0.1: OpenAI routes (also streamed, also
through the OpenAI Python client), every request field answered or refused by name, adapters by
model name, several policies (/v1/policies, /v1/triage by name, guard by the adapter's run
config), hot reload, online triage = offline triage, bearer auth, 4xx for bad and hostile bodies.

One server process is started for the module (two adapters re-aligned here for two policies,
three policies, one of them with an LLM judge rule); the reload test changes its folders last.
Expected texts, log-probabilities and token counts are computed here with transformers/peft
directly, not taken from the server.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import ROOT
from serve_helpers import random_adapter, realigned_adapter, sse, start_serve, stop, wait_ready

KEY = "test-key-5f1c0e"  # the server only ever sees its SHA-256
AUTH = {"Authorization": f"Bearer {KEY}"}
PKU_POLICY = ROOT / "configs" / "policies" / "pku_harm_v2.yaml"
KW_POLICY = "name: kw\nversion: '1'\nrules:\n  - {name: steps, kind: keywords, keywords: [step, detailed, flour]}\n"
LIMITS = {"max_text_chars": 4000, "max_body_bytes": 200_000, "max_items": 64, "max_tokens": 64, "body_timeout_s": 3}


def _pku_records(pku_path):
    from trace_ray.data.readers import iter_records

    return [r for r in iter_records(pku_path, "pku") if not r.get("_error")]


@pytest.fixture(scope="module")
def server(tiny_model_dir, pku_path, tmp_path_factory):
    from train_data import triaged_rows

    root = tmp_path_factory.mktemp("serve")
    base = Path(tiny_model_dir).resolve()
    policies = root / "policies"
    policies.mkdir()
    (policies / "kw.yaml").write_text(KW_POLICY)
    (policies / "judged.yaml").write_text(
        "name: judged\nversion: '1'\ndescription: no bread talk\nmode: any\nrules:\n"
        "  - {name: bread, kind: keywords, keywords: [bread]}\n"
        f"  - {{name: llm, kind: judge, backend: hf, model: '{base}', max_new_tokens: 3, system: 'Answer yes or no.'}}\n")
    v2 = realigned_adapter(base, PKU_POLICY, _pku_records(pku_path), root / "policy-v2")
    rows = [{k: r[k] for k in ("id", "prompt", "chosen", "rejected", "meta")} for r in triaged_rows()]
    v3 = realigned_adapter(base, policies / "kw.yaml", rows, root / "adapters" / "v3")
    sets = [x for k, v in LIMITS.items() for x in ("--set", f"limits.{k}={v}")]
    proc, url = start_serve(["--model", str(v2), "--adapter", str(root / "adapters"), "--policy", f"pku={PKU_POLICY}",
                             "--policy", str(policies), "--served-name", "tiny", "--reload-interval", "1",
                             "--set", "hf.num_cpus=0.5", *sets], root / "serve.log", key=KEY)
    try:
        wait_ready(proc, url)
        yield {"url": url, "v2": v2, "v3": v3, "base": base, "root": root, "proc": proc, "policies": policies}
    finally:
        stop(proc)


def _post(server, path, body=None, data=None, headers=AUTH, **kw):
    return requests.post(server["url"] + path, json=body, data=data, headers=headers, timeout=60, **kw)


# -- expected outputs, computed without the server -----------------------------------------------
def _load(model_dir, adapter_dir=None):
    from peft import PeftModel

    from trace_ray.models.load import load_model, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), attn_implementation=None)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    return tok, model


def _prompt(tok, messages=None, prompt=None) -> list[int]:
    from trace_ray.chat import prompt_ids

    return prompt_ids(tok, messages) if messages is not None else tok(prompt)["input_ids"]


def _local_greedy_ids(model_dir, adapter_dir, messages=None, prompt=None, max_new=8):
    """(prompt ids, generated ids without EOS) of a greedy decode, and the tokenizer."""
    import torch

    tok, model = _load(model_dir, adapter_dir)
    ids = torch.tensor([_prompt(tok, messages, prompt)])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    row = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in row:
        row = row[: row.index(tok.eos_token_id)]
    return ids[0].tolist(), row, tok


def _local_greedy(model_dir, adapter_dir, messages=None, prompt=None, max_new=8):
    ids, row, tok = _local_greedy_ids(model_dir, adapter_dir, messages, prompt, max_new)
    return tok.decode(row, skip_special_tokens=True), len(ids), len(row)


def _teacher_forced(model_dir, adapter_dir, prompt_ids: list[int], out_ids: list[int]):
    """log p(out_ids[t] | prompt, out_ids[:t]) for each t, and the log-softmax rows: [T], [T, V]."""
    import torch

    _, model = _load(model_dir, adapter_dir)
    ids = torch.tensor([prompt_ids + out_ids])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    rows = logp[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(out_ids)]
    return rows.gather(1, torch.tensor(out_ids).view(-1, 1)).squeeze(1), rows


MESSAGES = [{"role": "user", "content": "How do I bake bread?"}]


# -- routes ------------------------------------------------------------------------------------
def test_healthz_needs_no_key(server):
    r = requests.get(server["url"] + "/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"


@pytest.mark.parametrize("method,path", [("get", "/v1/models"), ("get", "/v1/policies"), ("post", "/v1/chat/completions"),
                                         ("post", "/v1/completions"), ("post", "/v1/triage")])
@pytest.mark.parametrize("header", [None, "Bearer wrong-key", f"Basic {KEY}", "Bearer"])
def test_every_route_but_healthz_needs_the_key(server, method, path, header):
    headers = {"Authorization": header} if header else {}
    r = requests.request(method, server["url"] + path, json={"prompt": "x", "response": "y"}, headers=headers, timeout=30)
    assert r.status_code == 401
    assert r.headers.get("WWW-Authenticate") == "Bearer"
    assert KEY not in r.text and "error" in r.json()


def test_models_lists_base_and_each_adapter(server):
    r = requests.get(server["url"] + "/v1/models", headers=AUTH, timeout=30)
    assert r.status_code == 200
    ids = [m["id"] for m in r.json()["data"]]
    assert ids == ["tiny", "tiny:policy-v2", "tiny:v3"]
    assert all(m["object"] == "model" for m in r.json()["data"])


def test_chat_completion_returns_the_models_text(server):
    expected, n_prompt, n_out = _local_greedy(server["base"], None, messages=MESSAGES)
    r = _post(server, "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["choices"][0]["logprobs"] is None  # not asked for
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
    assert body["choices"][0]["finish_reason"] == ("length" if n_out == 8 else "stop")


def test_chat_completion_streams_server_sent_events(server):
    expected, n_prompt, n_out = _local_greedy(server["base"], None, messages=MESSAGES)
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    r = _post(server, "/v1/chat/completions", body, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1
    assert chunks[-1]["usage"]["completion_tokens"] == n_out and chunks[-1]["usage"]["prompt_tokens"] == n_prompt


def test_completion_streams_and_batches(server):
    prompts = ["The weather", "Step 1: gather", "How do I"]
    r = _post(server, "/v1/completions", {"prompt": prompts, "max_tokens": 6, "temperature": 0, "n": 2})
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in r.json()["choices"]]
    local = [_local_greedy(server["base"], None, prompt=p, max_new=6) for p in prompts]
    assert texts == [t for t, _, _ in local for _ in range(2)]  # prompt-major, n per prompt
    assert [c["index"] for c in r.json()["choices"]] == list(range(6))
    # usage: each prompt's tokens once, every choice's tokens
    assert r.json()["usage"]["prompt_tokens"] == sum(n for _, n, _ in local)
    assert r.json()["usage"]["completion_tokens"] == 2 * sum(k for _, _, k in local)
    r = _post(server, "/v1/completions", {"prompt": prompts[:2], "max_tokens": 6, "temperature": 0, "stream": True},
              stream=True)
    chunks = sse(r)
    got = {i: "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in (0, 1)}
    assert got == {0: texts[0], 1: texts[2]}


def test_streaming_n_choices(server):
    """``n > 1`` with ``stream: true``: every choice streams under its own index, ends once."""
    expected, n_prompt, n_out = _local_greedy(server["base"], None, messages=MESSAGES)
    r = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "n": 3,
                                               "stream": True, "stream_options": {"include_usage": True}}, stream=True)
    chunks = sse(r)
    for i in range(3):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == expected
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [("length" if n_out == 8 else "stop")]
    assert chunks[-1]["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 3 * n_out,
                                   "total_tokens": n_prompt + 3 * n_out}


def test_adapter_is_selectable_by_model_name(server):
    base = _local_greedy(server["base"], None, messages=MESSAGES)[0]
    v2 = _local_greedy(server["base"], server["v2"], messages=MESSAGES)[0]
    v3 = _local_greedy(server["base"], server["v3"], messages=MESSAGES)[0]
    assert len({base, v2, v3}) == 3  # the fixture's adapters really change the model
    got = {}
    for name in ("tiny", "tiny:policy-v2", "policy-v2", "tiny:v3"):
        r = _post(server, "/v1/chat/completions", {"model": name, "messages": MESSAGES, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        got[name] = r.json()["choices"][0]["message"]["content"]
    assert got == {"tiny": base, "tiny:policy-v2": v2, "policy-v2": v2, "tiny:v3": v3}


def test_adapter_names_may_hold_dots(server):
    # A served name like "trace_lr0.002" or "policy-v1.2" is not a valid torch module name; each
    # adapter must still load under its own name and give its own answers.
    from serve.hf_backend import HFGenerator

    gen = HFGenerator(str(server["base"]), {"policy-v1.2": str(server["v2"]), "policy-v1_2": str(server["v3"])})
    assert set(gen.loaded) == {"policy-v1.2", "policy-v1_2"}
    got = {}
    for name in (None, "policy-v1.2", "policy-v1_2"):
        (res,) = gen._run_batch([{"model": name, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}])
        got[name] = res["choices"][0]["text"]
    assert got == {None: _local_greedy(server["base"], None, messages=MESSAGES)[0],
                   "policy-v1.2": _local_greedy(server["base"], server["v2"], messages=MESSAGES)[0],
                   "policy-v1_2": _local_greedy(server["base"], server["v3"], messages=MESSAGES)[0]}


def test_sampling_n_choices(server):
    r = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4, "n": 3, "temperature": 1.0})
    assert r.status_code == 200
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
    r = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 8, "temperature": 1e-6})
    assert r.status_code == 200  # near-zero temperature decodes greedily instead of overflowing
    assert r.json()["choices"][0]["message"]["content"] == _local_greedy(server["base"], None, messages=MESSAGES)[0]


# -- the OpenAI fields the transformers backend implements -------------------------------------------
def test_logprobs_are_the_models_log_probabilities(server):
    """Chat ``logprobs``/``top_logprobs`` and completion ``logprobs`` equal a teacher-forced forward
    of the same model (adapter included) over the prompt and the answer's tokens."""
    import torch

    p_ids, out_ids, tok = _local_greedy_ids(server["base"], server["v3"], messages=MESSAGES, max_new=8)
    want, rows = _teacher_forced(server["base"], server["v3"], p_ids, out_ids)
    r = _post(server, "/v1/chat/completions", {"model": "tiny:v3", "messages": MESSAGES, "max_tokens": 8,
                                               "temperature": 0, "logprobs": True, "top_logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert [e["token"] for e in content] == [tok.decode([t]) for t in out_ids]
    assert torch.allclose(torch.tensor([e["logprob"] for e in content]), want, atol=1e-4)
    for e, row in zip(content, rows):
        top = torch.topk(row, 3)
        assert [t["token"] for t in e["top_logprobs"]] == [tok.decode([i]) for i in top.indices.tolist()]
        assert torch.allclose(torch.tensor([t["logprob"] for t in e["top_logprobs"]]), top.values, atol=1e-4)
        assert e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"], abs=1e-6)  # greedy took the top one
        assert e["bytes"] == list(e["token"].encode())
    # completions: the legacy shape, the sampled token always among top_logprobs
    c_ids, c_out, _ = _local_greedy_ids(server["base"], None, prompt="The weather", max_new=6)
    want, _ = _teacher_forced(server["base"], None, c_ids, c_out)
    r = _post(server, "/v1/completions", {"prompt": "The weather", "max_tokens": 6, "temperature": 0, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert torch.allclose(torch.tensor(lp["token_logprobs"]), want, atol=1e-4)
    assert all(t in top and len(top) in (2, 3) for t, top in zip(lp["tokens"], lp["top_logprobs"]))
    assert lp["text_offset"] == [len(tok.decode(c_out[:k], skip_special_tokens=True)) for k in range(len(c_out))]
    # streamed: the same entries, split over the chunks
    r = _post(server, "/v1/chat/completions", {"model": "tiny:v3", "messages": MESSAGES, "max_tokens": 8,
                                               "temperature": 0, "logprobs": True, "stream": True}, stream=True)
    streamed = [e for c in sse(r) if c["choices"] and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-6)


def test_seed_makes_sampling_repeatable(server):
    def ask(seed, n=2):
        body = {"prompt": "The weather", "max_tokens": 12, "temperature": 1.0, "n": n}
        if seed is not None:
            body["seed"] = seed
        r = _post(server, "/v1/completions", body)
        assert r.status_code == 200, r.text
        return [c["text"] for c in r.json()["choices"]]

    first = ask(1234)
    assert ask(1234) == first  # same seed, same answers (both choices)
    assert first[0] != first[1]  # n choices are different samples
    assert ask(99) != first
    assert ask(None) != ask(None)  # without a seed, sampling is not repeated


def test_stop_strings_cut_where_the_model_writes_them(server):
    """The answer ends before the first stop string; generation stopped at the token that completed
    it (usage counts up to it); the same cut when streamed."""
    for prompt in ("How do I bake bread?", "The weather", "Step 1: gather"):
        p_ids, out_ids, tok = _local_greedy_ids(server["base"], None, messages=[{"role": "user", "content": prompt}],
                                                max_new=16)
        text = tok.decode(out_ids, skip_special_tokens=True)
        spots = [i for i in range(1, len(text) - 1)
                 if text[i:i + 2].isascii() and text[i:i + 2].isprintable() and text.find(text[i:i + 2]) == i]
        if spots:
            break
    else:
        pytest.fail(f"no printable stop string in the tiny model's answers (last: {text!r})")
    i = spots[0]
    stop_s = text[i:i + 2]
    m = next(k for k in range(1, len(out_ids) + 1) if stop_s in tok.decode(out_ids[:k], skip_special_tokens=True))
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0,
            "stop": ["zzzz-never", stop_s]}
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == text[:i]
    assert choice["finish_reason"] == "stop"
    assert r.json()["usage"]["completion_tokens"] == m
    r = _post(server, "/v1/chat/completions", {**body, "stream": True}, stream=True)
    chunks = sse(r)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text[:i]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["stop"]


def test_openai_python_client(server):
    """The client users call the server with: chat, chat streamed with n = 2, completions, errors."""
    import openai

    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)
    expected = _local_greedy(server["base"], server["v2"], messages=MESSAGES)[0]
    chat = client.chat.completions.create(model="tiny:policy-v2", messages=MESSAGES, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=2, seed=3, user="u-1")
    assert chat.choices[0].message.content == expected
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 2
    stream = client.chat.completions.create(model="tiny:policy-v2", messages=MESSAGES, max_tokens=8, temperature=0,
                                            n=2, stream=True, stream_options={"include_usage": True})
    texts, usage = {0: "", 1: ""}, None
    for part in stream:
        for ch in part.choices:
            texts[ch.index] += ch.delta.content or ""
        usage = part.usage or usage
    assert texts == {0: expected, 1: expected} and usage.completion_tokens == 2 * chat.usage.completion_tokens
    comp = client.completions.create(model="tiny", prompt="The weather", max_tokens=6, temperature=0, logprobs=1)
    assert comp.choices[0].text == _local_greedy(server["base"], None, prompt="The weather", max_new=6)[0]
    assert len(comp.choices[0].logprobs.tokens) == comp.usage.completion_tokens
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, presence_penalty=0.5)
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert [m.id for m in client.models.list()] == ["tiny", "tiny:policy-v2", "tiny:v3"]


# Every OpenAI / vLLM field the transformers backend does not implement: a value that would change
# the answer is a 400 naming the field; its no-op value (or a pure label) is accepted.
UNSUPPORTED = [
    ("presence_penalty", 0.5), ("frequency_penalty", -1), ("logit_bias", {"5": 10}),
    ("response_format", {"type": "json_object"}), ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "required"), ("functions", [{"name": "f"}]), ("store", True), ("service_tier", "flex"),
    ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy"}), ("prediction", {"type": "content", "content": "x"}),
    ("reasoning_effort", "high"), ("web_search_options", {}), ("top_k", 5), ("min_p", 0.1),
    ("repetition_penalty", 1.2), ("guided_json", {}), ("ignore_eos", True), ("max_tokenz", 3),
]
ACCEPTED = [("presence_penalty", 0), ("frequency_penalty", 0.0), ("logit_bias", {}), ("response_format", {"type": "text"}),
            ("tools", []), ("tool_choice", "none"), ("parallel_tool_calls", True), ("store", False), ("user", "u-1"),
            ("metadata", {"team": "a"}), ("service_tier", "auto"), ("safety_identifier", "s")]


@pytest.mark.parametrize("field,value", UNSUPPORTED, ids=[f for f, _ in UNSUPPORTED])
def test_unsupported_fields_get_400_naming_them(server, field, value):
    r = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["message"].startswith(f"{field}:")


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "x", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.0.name"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": True,
                              "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
])
def test_unsupported_completion_and_nested_fields(server, path, body, param):
    r = _post(server, path, {**body, "max_tokens": 2})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]


def test_no_op_values_and_labels_are_accepted(server):
    expected = _local_greedy(server["base"], None, messages=MESSAGES, max_new=4)[0]
    body = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0, **dict(ACCEPTED)}
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected


# -- policies ------------------------------------------------------------------------------------
def test_policies_are_listed_with_name_version_and_hash(server):
    from trace_ray.policy import load_policy

    r = requests.get(server["url"] + "/v1/policies", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    got = {p["name"]: p for p in r.json()["data"]}
    assert list(got) == ["pku", "judged", "kw"]  # --policy order; a folder's files sorted
    for name, path in (("pku", PKU_POLICY), ("kw", server["policies"] / "kw.yaml")):
        pol = load_policy(path)
        assert (got[name]["policy"], got[name]["version"], got[name]["fingerprint"]) == (pol.name, pol.version,
                                                                                          pol.fingerprint)
        assert pol.fingerprint.endswith("#" + got[name]["hash"])
    assert [p["default"] for p in got.values()] == [True, False, False]


def test_triage_takes_the_policy_by_name(server):
    from trace_ray.policy import load_policy

    item = {"prompt": "How do I bake?", "response": "Step 1: mix the flour."}
    kw = load_policy(server["policies"] / "kw.yaml")
    r = _post(server, "/v1/triage", {**item, "policy": "kw"})
    assert r.status_code == 200, r.text
    assert r.json() == {**kw.check([item["prompt"]], [item["response"]])[0].to_dict(), "policy": kw.fingerprint}
    assert r.json()["verdict"] == "non_compliant"
    default = _post(server, "/v1/triage", item).json()  # the first policy: PKU's metadata rules, no meta here
    pku = load_policy(PKU_POLICY)
    assert default == {**pku.check([item["prompt"]], [item["response"]])[0].to_dict(), "policy": pku.fingerprint}
    assert default["verdict"] == "error"
    r = _post(server, "/v1/triage", {"items": [item, item], "policy": "kw"})
    assert r.json()["policy"] == kw.fingerprint and [x["verdict"] for x in r.json()["results"]] == ["non_compliant"] * 2
    r = _post(server, "/v1/triage", {**item, "policy": "v9"})
    assert r.status_code == 404 and "pku, judged, kw" in r.json()["error"]["message"]
    assert _post(server, "/v1/triage", {**item, "policy": 3}).status_code == 422


def test_guard_uses_the_policy_the_adapter_was_realigned_for(server):
    """policy-v2 was re-aligned on rows triaged with pku_harm_v2, v3 with kw (their run configs
    say so); the base has no run config, so the default policy guards it."""
    from trace_ray.policy import load_policy

    fps = {"pku": load_policy(PKU_POLICY).fingerprint, "kw": load_policy(server["policies"] / "kw.yaml").fingerprint}
    cards = {m["id"]: m for m in requests.get(server["url"] + "/v1/models", headers=AUTH, timeout=30).json()["data"]}
    assert (cards["tiny:policy-v2"]["policy"], cards["tiny:policy-v2"]["realigned_for"]) == ("pku", fps["pku"])
    assert (cards["tiny:v3"]["policy"], cards["tiny:v3"]["realigned_for"]) == ("kw", fps["kw"])
    assert (cards["tiny"]["policy"], cards["tiny"]["realigned_for"]) == ("pku", None)
    for model, name in (("tiny:v3", "kw"), ("tiny:policy-v2", "pku"), ("tiny", "pku")):
        r = _post(server, "/v1/chat/completions", {"model": model, "messages": MESSAGES, "max_tokens": 6,
                                                   "temperature": 0, "guard": True})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        pol = load_policy(PKU_POLICY if name == "pku" else server["policies"] / "kw.yaml")
        expected = pol.check([MESSAGES[0]["content"]], [choice["message"]["content"]], [{}])[0]
        assert choice["guard"] == {**expected.to_dict(), "policy": fps[name]}


# -- triage ------------------------------------------------------------------------------------
def test_triage_batch_equals_offline_triage(server, pku_path):
    from trace_ray.policy import load_policy
    from trace_ray.triage import triage_records

    records = _pku_records(pku_path)
    assert len(records) == 50
    offline = triage_records(load_policy(PKU_POLICY), records)
    items = [{"id": r["id"], "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
              "meta": json.loads(r["meta"])} for r in records]
    r = _post(server, "/v1/triage", {"items": items})
    assert r.status_code == 200, r.text
    online = r.json()["results"]
    assert len(online) == len(offline)
    for on, off in zip(online, offline):
        assert on["id"] == off["id"]
        for k in ("chosen_verdict", "rejected_verdict", "category", "policy"):
            assert on[k] == off[k], (k, on, off)
        assert on["reasons"] == json.loads(off["reasons"])
    assert {o["category"] for o in online} >= {"retain"}  # the real rows give a real mix
    # A bare JSON list is the same batch.
    r2 = _post(server, "/v1/triage", items[:5])
    assert r2.json()["results"] == online[:5]


def test_triage_single_pair_and_single_response(server, pku_path):
    from trace_ray.policy import load_policy

    policy = load_policy(PKU_POLICY)
    rec = _pku_records(pku_path)[0]
    meta = json.loads(rec["meta"])
    r = _post(server, "/v1/triage", {"prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"],
                                     "meta": meta})
    assert r.status_code == 200 and set(r.json()) >= {"chosen_verdict", "rejected_verdict", "category", "reasons"}
    for side in ("chosen", "rejected"):
        expected = policy.check([rec["prompt"]], [rec[side]], [meta[side]])[0]
        r = _post(server, "/v1/triage", {"prompt": rec["prompt"], "response": rec[side], "meta": meta[side]})
        assert r.status_code == 200, r.text
        assert r.json() == {"verdict": expected.verdict, "reasons": expected.reasons, "policy": policy.fingerprint}


def test_guard_mode_reports_the_policy_verdict(server):
    from trace_ray.policy import load_policy

    r = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "guard": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    expected = load_policy(PKU_POLICY).check([MESSAGES[0]["content"]], [choice["message"]["content"]], [{}])[0]
    assert choice["guard"]["verdict"] == expected.verdict
    r = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6, "temperature": 0})
    assert "guard" not in r.json()["choices"][0]
    r = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "guard": True,
                                               "stream": True}, stream=True)
    final = [c for c in sse(r) if c["choices"] and c["choices"][0]["finish_reason"]]
    assert final[0]["guard"]["verdict"] == expected.verdict


def test_judge_rule_is_answered_by_an_llm_deployment(server):
    from trace_ray.policy import load_policy
    from trace_ray.policy.judge import HFJudge
    from trace_ray.triage import triage_records

    policy = load_policy(server["policies"] / "judged.yaml")
    records = [{"id": f"r{i}", "prompt": p, "chosen": c, "rejected": r, "meta": "{}", "_error": None}
               for i, (p, c, r) in enumerate([
                   ("How do I bake bread?", "Mix flour and water.", "I can't help with that."),
                   ("What is the weather?", "Sunny today.", "Bread is nice."),
               ])]
    answers = HFJudge(policy.judge_rule).answers(records)  # the offline judge, in this process
    offline = triage_records(policy, records, judge_answers=answers)
    items = [{k: r[k] for k in ("id", "prompt", "chosen", "rejected")} for r in records]
    r = _post(server, "/v1/triage", {"items": items, "policy": "judged"})
    assert r.status_code == 200, r.text
    for on, off in zip(r.json()["results"], offline):
        assert (on["chosen_verdict"], on["rejected_verdict"], on["category"]) == (
            off["chosen_verdict"], off["rejected_verdict"], off["category"])
        assert on["reasons"] == json.loads(off["reasons"])
    assert "judge" in json.dumps(r.json())  # the judge rule took part (its answer or its verdict)


def test_metrics_reach_rays_prometheus_endpoint(server):
    """Request counts, latency and verdict counts appear in the server's Ray node Prometheus export."""
    import tempfile

    ports = list(Path(tempfile.gettempdir(), "ray").glob(f"session_*_{server['proc'].pid}/metrics_export_port_*"))
    if not ports:
        pytest.skip("this Ray node exports no metrics")
    port = int(ports[0].read_text().strip())
    _post(server, "/v1/triage", {"prompt": "p", "response": "r"})
    wanted = ("trace_serve_requests", "trace_serve_request_latency_ms", "trace_serve_verdicts")
    deadline, text = time.time() + 45, ""
    while time.time() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(w in text for w in wanted) and 'path="/v1/triage"' in text:
            break
        time.sleep(2)
    missing = [w for w in wanted if w not in text]
    assert not missing, f"not exported: {missing}"


# -- bad and hostile input ------------------------------------------------------------------------
GOOD_CHAT = {"messages": MESSAGES, "max_tokens": 2, "temperature": 0}
BAD = [
    ("/v1/chat/completions", b"{", 400, "malformed JSON"),
    ("/v1/chat/completions", b"", 400, "empty body"),
    ("/v1/chat/completions", b"\xff\xfe{}", 400, "malformed JSON"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "surrogate"),
    ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400, "nested deeper"),
    ("/v1/triage", json.dumps({"prompt": "p", "response": "r", "meta": json.loads('{"a":' * 40 + "1" + "}" * 40)}).encode(),
     400, "nested deeper than 32"),
    ("/v1/chat/completions", b"[1, 2]", 422, "body"),
    ("/v1/chat/completions", b"{}", 422, "messages"),
    ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), 422, "messages"),
    ("/v1/chat/completions", json.dumps({"messages": []}).encode(), 422, "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 422, "role"),
    ("/v1/chat/completions", json.dumps({**GOOD_CHAT, "max_tokens": "9"}).encode(), 422, "max_tokens"),
    ("/v1/chat/completions", json.dumps({**GOOD_CHAT, "max_tokens": 65}).encode(), 422, "limit is 64"),
    ("/v1/chat/completions", json.dumps({**GOOD_CHAT, "temperature": 7}).encode(), 422, "temperature"),
    ("/v1/chat/completions", json.dumps({**GOOD_CHAT, "n": 99}).encode(), 422, "n is 99"),
    ("/v1/chat/completions", json.dumps({**GOOD_CHAT, "stream": "yes"}).encode(), 422, "stream"),
    ("/v1/chat/completions", json.dumps({**GOOD_CHAT, "top_logprobs": 21, "logprobs": True}).encode(), 422, "top_logprobs"),
    ("/v1/chat/completions", json.dumps({**GOOD_CHAT, "top_logprobs": 2}).encode(), 422, "needs logprobs"),
    ("/v1/chat/completions", json.dumps({**GOOD_CHAT, "seed": "x"}).encode(), 422, "seed"),
    ("/v1/chat/completions", json.dumps({**GOOD_CHAT, "seed": 2**70}).encode(), 422, "seed"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 422, "temperature"),
    ("/v1/chat/completions", json.dumps({**GOOD_CHAT, "model": "nope"}).encode(), 404, "not served"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x" * 4001}]}).encode(), 413,
     "limit is 4000"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x" * 250_000}]}).encode(), 413,
     "limit is 200000"),
    ("/v1/completions", json.dumps({"prompt": 5}).encode(), 422, "prompt"),
    ("/v1/completions", json.dumps({"prompt": []}).encode(), 422, "prompt"),
    ("/v1/completions", json.dumps({"prompt": "hi", "stop": ["a"] * 9}).encode(), 422, "stop"),
    ("/v1/completions", json.dumps({"prompt": "hi", "logprobs": True}).encode(), 422, "logprobs"),
    ("/v1/triage", b"not json", 400, "malformed JSON"),
    ("/v1/triage", json.dumps({"prompt": "p"}).encode(), 422, "either"),
    ("/v1/triage", json.dumps({"prompt": "p", "chosen": "a"}).encode(), 422, "both"),
    ("/v1/triage", json.dumps({"prompt": "p", "response": "r", "chosen": "a", "rejected": "b"}).encode(), 422, "either"),
    ("/v1/triage", json.dumps({"prompt": "p", "response": 3}).encode(), 422, "response"),
    ("/v1/triage", json.dumps({"prompt": "p", "response": "r", "colour": 1}).encode(), 422, "colour"),
    ("/v1/triage", json.dumps({"items": []}).encode(), 422, "items"),
    ("/v1/triage", json.dumps([{"prompt": "p", "response": "r"}] * 65).encode(), 413, "limit is 64"),
    ("/v1/triage", json.dumps({"prompt": "p", "response": "r" * 4001}).encode(), 413, "items[0].response"),
    ("/v1/completions", json.dumps({"prompt": "", "max_tokens": 2}).encode(), 400, "empty"),
    ("/v1/chat/completions", json.dumps({**GOOD_CHAT, "messages": [{"role": "user", "content": "x " * 600}]}).encode(),
     400, "context"),
]


@pytest.mark.parametrize("path,data,status,needle", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_bodies_get_4xx_with_a_message(server, path, data, status, needle):
    r = _post(server, path, data=data, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_non_numeric_severity_is_an_error_verdict(server):
    """``meta.severity: "high"`` cannot be compared by the policy's ``severity_at_least`` rule: the
    server answers 200 with an ``error`` verdict (the pair is unresolved), as offline triage does."""
    from trace_ray.policy import load_policy
    from trace_ray.triage import triage_records

    r = _post(server, "/v1/triage", {"prompt": "p", "response": "r", "meta": {"severity": "high"}})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["verdict"] == "error" and any("not a number" in x for x in got["reasons"])
    pair = {"prompt": "p", "chosen": "a", "rejected": "b",
            "meta": {"chosen": {"severity": "high"}, "rejected": {"severity": 0}}}
    r = _post(server, "/v1/triage", pair)
    assert r.status_code == 200, r.text
    got = r.json()
    (offline,) = triage_records(load_policy(PKU_POLICY), [{**pair, "id": "x", "meta": json.dumps(pair["meta"])}])
    assert got["category"] == offline["category"] == "unresolved"
    assert got["chosen_verdict"] == offline["chosen_verdict"] == "error"


def _answered_meanwhile(server, during) -> list[int]:
    """Run ``during()`` while a client keeps asking /v1/triage; the statuses it got."""
    statuses, done = [], threading.Event()

    def other():
        while not done.is_set():
            statuses.append(_post(server, "/v1/triage", {"prompt": "p", "response": "r"}).status_code)
            time.sleep(0.05)

    t = threading.Thread(target=other)
    t.start()
    try:
        during()
    finally:
        done.set()
        t.join()
    return statuses


def test_large_bodies_get_413_while_others_are_served(server):
    """10 MB, declared (413 before reading) and chunked without a Content-Length (413 at the cap)."""
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * 10_000_000 + b'"}]}'
    got = {}

    def send():
        got["declared"] = _post(server, "/v1/chat/completions", data=big,
                                headers={**AUTH, "Content-Type": "application/json"})
        got["chunked"] = _post(server, "/v1/chat/completions", data=(big[i:i + 65536] for i in range(0, len(big), 65536)),
                               headers={**AUTH, "Content-Type": "application/json"})

    statuses = _answered_meanwhile(server, send)
    assert got["declared"].status_code == 413 and "limit is 200000" in got["declared"].json()["error"]["message"]
    assert got["chunked"].status_code == 413 and "over 200000 bytes" in got["chunked"].json()["error"]["message"]
    assert statuses and set(statuses) == {200}


def test_slow_client_times_out_cleanly_while_others_are_served(server):
    """A client that sends its body slower than ``limits.body_timeout_s`` (3 s here) gets a 408;
    one that never finishes its headers holds only its own connection."""
    host, port = server["url"].rsplit("/", 1)[-1].split(":")
    reply = {}

    def slow():
        idle = socket.create_connection((host, int(port)), timeout=30)  # headers never finished
        idle.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        s = socket.create_connection((host, int(port)), timeout=30)
        body = json.dumps(GOOD_CHAT).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body[:5])
        t0 = time.time()
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            part = s.recv(65536)
            if not part:
                break
            data += part
        reply["status"], reply["seconds"], reply["body"] = int(data.split()[1]), time.time() - t0, data
        s.close()
        idle.close()

    statuses = _answered_meanwhile(server, slow)
    assert reply["status"] == 408, reply["body"][-300:]
    assert b"did not arrive within 3 s" in reply["body"] and 2.5 < reply["seconds"] < 30
    assert statuses and set(statuses) == {200}


def test_server_still_answers_after_bad_bodies(server):
    for data in (b"{", b"\x00" * 10, b'{"messages": 1}', b"[" * 50_000):
        _post(server, "/v1/chat/completions", data=data, headers={**AUTH, "Content-Type": "application/json"})
    assert requests.get(server["url"] + "/healthz", timeout=30).status_code == 200
    r = _post(server, "/v1/chat/completions", GOOD_CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    assert _post(server, "/v1/triage", {"prompt": "p", "response": "r"}).status_code == 200


# -- hot reload (changes the server's folders: keep it last among the server's tests) --------------
def test_new_adapter_and_policy_files_are_picked_up_without_a_restart(server):
    """A new adapter folder, an edited policy and a new policy file appear within the reload interval;
    the same replicas keep serving (Serve reconfigure): no request fails meanwhile."""
    from trace_ray.policy import load_policy

    v4 = random_adapter(server["base"], server["root"] / "adapters" / "v4", seed=4)
    kw = server["policies"] / "kw.yaml"
    failures, done = [], threading.Event()

    def traffic():  # requests in flight across the reload
        while not done.is_set():
            r = _post(server, "/v1/chat/completions", {"model": "tiny:v3", "messages": MESSAGES, "max_tokens": 8,
                                                       "temperature": 0, "stream": True}, stream=True)
            chunks = sse(r) if r.status_code == 200 else []
            if r.status_code != 200 or not chunks or not any(c["choices"] and c["choices"][0]["finish_reason"]
                                                              for c in chunks):
                failures.append((r.status_code, r.text[:200]))

    t = threading.Thread(target=traffic)
    t.start()
    try:
        kw.write_text(KW_POLICY.replace("version: '1'", "version: '2'").replace("flour]", "flour, bake]"))
        shutil.copy(kw, server["policies"] / "kw2.yaml")
        deadline, ids = time.time() + 60, []
        while time.time() < deadline:
            ids = [m["id"] for m in requests.get(server["url"] + "/v1/models", headers=AUTH, timeout=30).json()["data"]]
            pols = {p["name"]: p for p in requests.get(server["url"] + "/v1/policies", headers=AUTH, timeout=30).json()["data"]}
            reloaded = "reloaded: +adapter v4" in Path(server["proc"].log_path).read_text()  # printed once Serve is done
            if "tiny:v4" in ids and "kw2" in pols and pols["kw"]["version"] == "2" and reloaded:
                break
            time.sleep(0.5)
    finally:
        done.set()
        t.join()
    assert ids == ["tiny", "tiny:policy-v2", "tiny:v3", "tiny:v4"]
    assert pols["kw"]["fingerprint"] == load_policy(kw).fingerprint
    assert not failures, failures[:3]
    r = _post(server, "/v1/chat/completions", {"model": "tiny:v4", "messages": MESSAGES, "max_tokens": 8, "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == _local_greedy(server["base"], v4, messages=MESSAGES)[0]
    r = _post(server, "/v1/triage", {"prompt": "p", "response": "Then bake it.", "policy": "kw"})
    assert r.json()["verdict"] == "non_compliant" and r.json()["reasons"] == ["steps: keyword 'bake'"]
    log = Path(server["proc"].log_path).read_text()
    assert "reloaded: +adapter v4" in log and "~policy kw" in log and "+policy kw2" in log
    assert log.count("Adding 1 replica to Deployment(name='HFGenerator'") == 1  # updated in place, never restarted
    # an invalid edit is reported, and what was loaded keeps serving
    kw.write_text("name: kw\nversion: '3'\nrules: [{kind: nope}]\n")
    deadline = time.time() + 30
    while "reload skipped" not in Path(server["proc"].log_path).read_text() and time.time() < deadline:
        time.sleep(0.5)
    assert "reload skipped" in Path(server["proc"].log_path).read_text()
    assert _post(server, "/v1/triage", {"prompt": "p", "response": "bake", "policy": "kw"}).json()["verdict"] == "non_compliant"


# -- building the app (no deployment) -------------------------------------------------------------
def test_callable_rules_are_refused(tmp_path, tiny_model_dir):
    from serve.app import build_app
    from serve.triage_backend import PolicyRefused

    p = tmp_path / "p.yaml"
    p.write_text("name: c\nversion: '1'\nrules:\n  - {name: mine, kind: callable, function: 'os.path:join'}\n")
    with pytest.raises(PolicyRefused, match="callable rules \\(mine\\)"):
        build_app({"model": str(tiny_model_dir), "policy": str(p)})


def test_build_app_validates_serve_run_arguments(tiny_model_dir, tmp_path):
    from serve.app import build_app
    from trace_ray.config import ConfigError

    app = build_app({"model": str(tiny_model_dir), "guard": "false", "limits.max_items": "8", "hf.max_batch_size": "4"})
    assert app is not None
    with pytest.raises(ConfigError, match="limits.max_items: expected an integer"):
        build_app({"model": str(tiny_model_dir), "limits.max_items": "many"})
    with pytest.raises(ConfigError, match="backend"):
        build_app({"model": str(tiny_model_dir), "backend": "tpu"})
    with pytest.raises(ConfigError, match="not a peft adapter"):
        build_app({"model": str(tiny_model_dir), "adapters": f"x={tiny_model_dir}"})
    with pytest.raises(FileNotFoundError):
        build_app({"model": str(tiny_model_dir / "missing")})
    (tmp_path / "a.yaml").write_text(KW_POLICY)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "a.yaml").write_text(KW_POLICY)
    with pytest.raises(ConfigError, match="policy name 'a' is used twice"):
        build_app({"model": str(tiny_model_dir), "policy": f"{tmp_path / 'a.yaml'},{tmp_path / 'b'}"})
    with pytest.raises(ConfigError, match="does not exist"):
        build_app({"model": str(tiny_model_dir), "policy": str(tmp_path / "missing.yaml")})


def test_hub_ids_are_models_and_missing_local_paths_are_not(tiny_model_dir, tmp_path, monkeypatch):
    """``Qwen/Qwen2.5-7B-Instruct`` (what the KubeRay RayService serves) is a hub id that vLLM or
    transformers fetch on the replica; a local path that does not exist stays a clear error."""
    import importlib.util

    import yaml

    from serve.app import build_app
    from serve.models import build_model_table
    from serve.settings import ServeSettings
    from trace_ray.config import ConfigError, from_dict

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    table = build_model_table("Qwen/Qwen2.5-7B-Instruct", {})
    assert (table.base_spec, table.base_name, table.adapters) == ("Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct", {})
    assert build_model_table("meta-llama/Llama-3.1-8B-Instruct", {}, "llama").ids() == ["llama"]
    for missing in (str(tiny_model_dir / "missing"), "runs/polcy-v2", "./org/name", "a/b/c", "nothing"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            build_model_table(missing, {})
    assert build_model_table(str(tiny_model_dir), {}).base_spec == str(tiny_model_dir)  # local wins

    # the RayService's own settings build their model table (the vLLM path then needs vllm on GPU)
    svc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice-serve.yaml").read_text())
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    s = from_dict(ServeSettings, app["args"])
    table = build_model_table(s.model, s.adapters, s.served_name)
    assert table.base_spec == "Qwen/Qwen2.5-7B-Instruct" and table.ids() == ["qwen2.5-7b"]
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match="needs the vllm package"):
            build_app({"model": "Qwen/Qwen2.5-7B-Instruct", "backend": "vllm"})


def test_vllm_backend_settings_fail_before_anything_starts(tiny_model_dir, tmp_path):
    """The GPU path is not exercised on CPU; its setting checks are (they need no vLLM)."""
    from serve.app import build_app
    from trace_ray.config import ConfigError

    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
    with pytest.raises(ConfigError, match="vllm.lora_path: ray.serve.llm loads LoRA adapters from object storage"):
        build_app({"model": str(adapter), "backend": "vllm"})
    with pytest.raises(ConfigError, match="upload v9 to <lora_path>/<name>/"):
        build_app({"model": str(tiny_model_dir), "backend": "vllm", "vllm.lora_path": "s3://b/adapters",
                   "adapters": {"v9": "s3://b/elsewhere/v9"}})
    with pytest.raises(ConfigError, match="must start with s3://"):
        build_app({"model": str(tiny_model_dir), "backend": "vllm", "vllm.lora_path": "/local/dir"})
    with pytest.raises(ConfigError, match="GGUF"):
        build_app({"model": "pypi:smollm2", "backend": "vllm"})
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match="needs the vllm package"):
            build_app({"model": str(tiny_model_dir), "backend": "vllm"})


def test_serve_config_file_is_valid():
    import yaml

    from serve.settings import ServeSettings
    from trace_ray.config import from_dict

    cfg = yaml.safe_load((ROOT / "serve" / "serve_config.yaml").read_text())
    (app,) = cfg["applications"]
    assert app["import_path"] == "serve.app:build_app"
    from_dict(ServeSettings, app["args"])
    assert cfg["http_options"]["host"] == "127.0.0.1"


def test_cli_help_documents_every_option(capsys):
    from trace_ray.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for opt in ("--model", "--policy", "--adapter", "--host", "--port", "--backend", "--guard", "--set", "--no-block",
                "--reload-interval", "--grace-period", "[NAME=]PATH", "SIGTERM", "/v1/policies"):
        assert opt in out
    assert "127.0.0.1" in out


def test_cli_rejects_bad_settings_before_starting(tiny_model_dir, capsys):
    from trace_ray.cli import main

    assert main(["serve", "--model", str(tiny_model_dir), "--set", "limits.max_tokens=0"]) == 2
    assert "limits.max_tokens" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_model_dir), "--policy", "v2=/nope.yaml"]) == 2
    assert "/nope.yaml does not exist" in capsys.readouterr().err


def test_vllm_path_forwards_every_field_unchanged():
    """The vLLM path (not run here: no GPU, no vllm wheel) validates the client's body with
    ray.serve.llm's request models and hands it on. With stand-ins for those models (vLLM's keep
    unknown fields, as these do), every field a client sends reaches LLMServer as sent; the
    Gateway only drops its own ``guard``, names the model ``<base>:<adapter>`` and applies limits."""
    from types import SimpleNamespace

    from pydantic import BaseModel, ConfigDict

    from serve.models import ModelTable
    from serve.schemas import ClientError
    from serve.settings import Limits
    from serve.vllm_backend import VLLMForwarder

    class _Req(BaseModel):  # the fields VLLMForwarder reads; vLLM's models have these and many more
        model_config = ConfigDict(extra="allow")
        model: str
        max_tokens: int | None = None
        max_completion_tokens: int | None = None
        n: int | None = 1
        stop: str | list[str] | None = None
        stream: bool | None = False

    class Chat(_Req):
        messages: list[dict]

    class Completion(_Req):
        prompt: str | list[str] | list[int]

    table = ModelTable("Qwen/Qwen2.5-7B-Instruct", "qwen", {"v3": "s3://b/adapters/v3"})
    gateway = SimpleNamespace(limits=Limits(max_tokens=64, max_n=4, max_text_chars=100),
                              _want_guard=lambda asked: bool(asked),
                              _adapter=lambda m: (table.resolve(m), m if ":" in (m or "") else f"qwen:{m}" if m else "qwen"))
    fwd = VLLMForwarder(None, table, models=(Chat, Completion, None))
    sent = {"model": "v3", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_completion_tokens": 16, "n": 2, "stop": ["\n"], "logprobs": True, "top_logprobs": 5, "seed": 7,
            "presence_penalty": 0.5, "frequency_penalty": 0.2, "logit_bias": {"42": -100}, "top_k": 20, "min_p": 0.05,
            "repetition_penalty": 1.1, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "auto",
            "guided_json": {"type": "object"}, "ignore_eos": True, "user": "u-1", "guard": True}
    request, adapter, model_id, guard, max_tokens = fwd.build("chat", sent, gateway)
    assert (adapter, model_id, guard, max_tokens) == ("v3", "qwen:v3", True, 16)
    expected = {k: v for k, v in sent.items() if k != "guard"} | {"model": "qwen:v3"}
    assert request.model_dump(exclude_unset=True) == expected
    request, *_ = fwd.build("completion", {"prompt": "hi", "echo": True, "best_of": 3}, gateway)
    assert request.model_dump(exclude_unset=True) == {"model": "qwen", "prompt": "hi", "echo": True, "best_of": 3,
                                                      "max_tokens": Limits().default_max_tokens}
    for body, status, needle in [({"prompt": "hi", "n": 5}, 422, "n is 5"),
                                 ({"prompt": "hi", "max_tokens": 65}, 422, "limit is 64"),
                                 ({"prompt": "x" * 101}, 413, "prompt[0]"),
                                 ({"prompt": "hi", "stream": True, "guard": True}, 400, "guard"),
                                 ({"prompt": 3.5}, 422, "prompt")]:
        with pytest.raises(ClientError, match=needle.replace("[", "\\[")) as e:
            fwd.build("completion", body, gateway)
        assert e.value.status == status
