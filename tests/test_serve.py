"""The Serve app over real HTTP on 127.0.0.1: OpenAI routes (also streamed), adapters by model
name, online triage = offline triage, bearer auth, 4xx for bad bodies.

One application is deployed for the whole module (Serve start-up is the expensive part).
Expected texts are computed here with transformers/peft directly, not taken from the server.
"""

from __future__ import annotations

import json
import socket

import pytest
import requests

from conftest import ROOT

KEY = "test-key-5f1c0e"  # the server only ever sees its SHA-256
AUTH = {"Authorization": f"Bearer {KEY}"}
PKU_POLICY = ROOT / "configs" / "policies" / "pku_harm_v2.yaml"
LIMITS = {"max_text_chars": 4000, "max_body_bytes": 200_000, "max_items": 64, "max_tokens": 64}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_adapter(base_dir, out_dir, seed: int):
    """A random (non-zero) LoRA adapter on the tiny model, saved the way the trainer saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"],
                                            init_lora_weights=False))
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def server(ray_session, tiny_model_dir, tmp_path_factory):
    from ray import serve

    from serve.app import build_from_settings
    from serve.settings import ServeSettings
    from trace_ray.config import from_dict

    root = tmp_path_factory.mktemp("serve")
    v2 = _make_adapter(tiny_model_dir, root / "policy-v2" / "adapter", seed=1)
    v3 = _make_adapter(tiny_model_dir, root / "v3_adapter", seed=2)
    settings = from_dict(ServeSettings, {
        "model": str(v2), "adapters": {"v3": str(v3)}, "served_name": "tiny",
        "policy": str(PKU_POLICY), "limits": LIMITS, "hf": {"num_cpus": 0.5},
    })
    app = build_from_settings(settings, api_key=KEY)
    port = _free_port()
    # Serve's HTTP options only apply when Serve starts: an earlier test in this Ray session (the
    # pipeline's serve check) may have left it running on another port, so start it afresh.
    serve.shutdown()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name="trace-test", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "v2": v2, "v3": v3, "base": tiny_model_dir, "root": root}
    serve.shutdown()


def _post(server, path, body=None, data=None, headers=AUTH, **kw):
    return requests.post(server["url"] + path, json=body, data=data, headers=headers, timeout=60, **kw)


# -- expected outputs, computed without the server -----------------------------------------------
def _local_greedy(model_dir, adapter_dir, messages=None, prompt=None, max_new=8):
    import torch
    from peft import PeftModel

    from trace_ray.models.load import load_model, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), attn_implementation=None)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    if messages is not None:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    row = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in row:
        row = row[: row.index(tok.eos_token_id)]
    return tok.decode(row, skip_special_tokens=True), ids.shape[1], len(row)


MESSAGES = [{"role": "user", "content": "How do I bake bread?"}]


# -- routes ------------------------------------------------------------------------------------
def test_healthz_needs_no_key(server):
    r = requests.get(server["url"] + "/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"


@pytest.mark.parametrize("method,path", [("get", "/v1/models"), ("post", "/v1/chat/completions"),
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
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
    assert body["choices"][0]["finish_reason"] == ("length" if n_out == 8 else "stop")


def _sse(r) -> list:
    events = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_chat_completion_streams_server_sent_events(server):
    expected, n_prompt, n_out = _local_greedy(server["base"], None, messages=MESSAGES)
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    r = _post(server, "/v1/chat/completions", body, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = _sse(r)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1
    assert chunks[-1]["usage"]["completion_tokens"] == n_out and chunks[-1]["usage"]["prompt_tokens"] == n_prompt


def test_completion_streams_and_batches(server):
    prompts = ["The weather", "Step 1: gather", "How do I"]
    r = _post(server, "/v1/completions", {"prompt": prompts, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in r.json()["choices"]]
    assert texts == [_local_greedy(server["base"], None, prompt=p, max_new=6)[0] for p in prompts]
    r = _post(server, "/v1/completions", {"prompt": prompts[0], "max_tokens": 6, "temperature": 0, "stream": True},
              stream=True)
    assert "".join(c["choices"][0]["text"] for c in _sse(r)) == texts[0]


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


def test_sampling_n_choices(server):
    r = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4, "n": 3, "temperature": 1.0})
    assert r.status_code == 200
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
    r = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 8, "temperature": 1e-6})
    assert r.status_code == 200  # near-zero temperature decodes greedily instead of overflowing
    assert r.json()["choices"][0]["message"]["content"] == _local_greedy(server["base"], None, messages=MESSAGES)[0]


# -- triage ------------------------------------------------------------------------------------
def _pku_records(pku_path):
    from trace_ray.data.readers import iter_records

    return [r for r in iter_records(pku_path, "pku") if not r.get("_error")]


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
    final = [c for c in _sse(r) if c["choices"] and c["choices"][0]["finish_reason"]]
    assert final[0]["guard"]["verdict"] == expected.verdict


def test_metrics_reach_rays_prometheus_endpoint(server):
    """Request counts, latency and verdict counts appear in the node's Prometheus export."""
    import time

    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    if not port:
        pytest.skip("this Ray node exports no metrics")
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


# -- bad input -----------------------------------------------------------------------------------
GOOD_CHAT = {"messages": MESSAGES, "max_tokens": 2, "temperature": 0}
BAD = [
    ("/v1/chat/completions", b"{", 400, "malformed JSON"),
    ("/v1/chat/completions", b"", 400, "empty body"),
    ("/v1/chat/completions", b"\xff\xfe{}", 400, "malformed JSON"),
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
    ("/v1/chat/completions", json.dumps({**GOOD_CHAT, "model": "nope"}).encode(), 404, "not served"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x" * 4001}]}).encode(), 413,
     "limit is 4000"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x" * 250_000}]}).encode(), 413,
     "limit is 200000"),
    ("/v1/completions", json.dumps({"prompt": 5}).encode(), 422, "prompt"),
    ("/v1/completions", json.dumps({"prompt": []}).encode(), 422, "prompt"),
    ("/v1/completions", json.dumps({"prompt": "hi", "stop": ["a"] * 9}).encode(), 422, "stop"),
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


def test_server_still_answers_after_bad_bodies(server):
    for data in (b"{", b"\x00" * 10, b'{"messages": 1}'):
        _post(server, "/v1/chat/completions", data=data, headers={**AUTH, "Content-Type": "application/json"})
    assert requests.get(server["url"] + "/healthz", timeout=30).status_code == 200
    r = _post(server, "/v1/chat/completions", GOOD_CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    assert _post(server, "/v1/triage", {"prompt": "p", "response": "r"}).status_code == 200


# -- building the app (no deployment) -------------------------------------------------------------
def test_callable_rules_are_refused(tmp_path, tiny_model_dir):
    from serve.app import build_app
    from serve.triage_backend import PolicyRefused

    p = tmp_path / "p.yaml"
    p.write_text("name: c\nversion: '1'\nrules:\n  - {name: mine, kind: callable, function: 'os.path:join'}\n")
    with pytest.raises(PolicyRefused, match="callable rules \\(mine\\)"):
        build_app({"model": str(tiny_model_dir), "policy": str(p)})


def test_build_app_validates_serve_run_arguments(tiny_model_dir):
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

    adapter = _make_adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
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
    for opt in ("--model", "--policy", "--adapter", "--host", "--port", "--backend", "--guard", "--set", "--no-block"):
        assert opt in out
    assert "127.0.0.1" in out


def test_cli_rejects_bad_settings_before_starting(tiny_model_dir, capsys):
    from trace_ray.cli import main

    assert main(["serve", "--model", str(tiny_model_dir), "--set", "limits.max_tokens=0"]) == 2
    assert "limits.max_tokens" in capsys.readouterr().err


# -- a judge rule: the triage deployment asks an LLM deployment ----------------------------------
@pytest.fixture(scope="module")
def judge_server(server, tiny_model_dir, tmp_path_factory):
    """A second application (route prefix /judge) whose policy has a judge rule on the tiny model."""
    from ray import serve

    from serve.app import build_app

    p = tmp_path_factory.mktemp("judge") / "judge_policy.yaml"
    p.write_text(
        "name: judged\nversion: '1'\ndescription: no bread talk\nmode: any\nrules:\n"
        "  - {name: bread, kind: keywords, keywords: [bread]}\n"
        f"  - {{name: llm, kind: judge, backend: hf, model: '{tiny_model_dir}', max_new_tokens: 3,"
        " system: 'Answer yes or no.'}\n"
    )
    serve.run(build_app({"model": str(tiny_model_dir), "policy": str(p), "hf.num_cpus": "0.25"}),
              name="trace-judge", route_prefix="/judge")
    yield {"url": server["url"] + "/judge", "policy": p}
    serve.delete("trace-judge")


def test_judge_rule_is_answered_by_an_llm_deployment(judge_server):
    from trace_ray.policy import load_policy
    from trace_ray.policy.judge import HFJudge
    from trace_ray.triage import triage_records

    policy = load_policy(judge_server["policy"])
    records = [{"id": f"r{i}", "prompt": p, "chosen": c, "rejected": r, "meta": "{}", "_error": None}
               for i, (p, c, r) in enumerate([
                   ("How do I bake bread?", "Mix flour and water.", "I can't help with that."),
                   ("What is the weather?", "Sunny today.", "Bread is nice."),
               ])]
    answers = HFJudge(policy.judge_rule).answers(records)  # the offline judge, in this process
    offline = triage_records(policy, records, judge_answers=answers)
    items = [{k: r[k] for k in ("id", "prompt", "chosen", "rejected")} for r in records]
    r = requests.post(judge_server["url"] + "/v1/triage", json=items, timeout=60)  # this app has no key
    assert r.status_code == 200, r.text
    for on, off in zip(r.json()["results"], offline):
        assert (on["chosen_verdict"], on["rejected_verdict"], on["category"]) == (
            off["chosen_verdict"], off["rejected_verdict"], off["category"])
        assert on["reasons"] == json.loads(off["reasons"])
    assert "judge" in json.dumps(r.json())  # the judge rule took part (its answer or its verdict)


@pytest.mark.slow  # starts a second Ray instance in a subprocess (~25 s on a quiet 2-core box)
def test_trace_ray_serve_command_end_to_end(tiny_model_dir, tmp_path):
    """The user's command in its own process (own Ray): key from $TRACE_API_KEY, loopback bind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    port, key = _free_port(), "cli-key-" + os.urandom(4).hex()
    env = {**os.environ, "TRACE_API_KEY": key, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "trace_ray", "serve", "--model", str(tiny_model_dir), "--policy", str(PKU_POLICY),
         "--port", str(port), "--served-name", "tiny", "--set", "hf.num_cpus=0.5"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(url + "/healthz", timeout=10).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or busy starting
                pass
            time.sleep(2)
        assert requests.get(url + "/v1/models", timeout=30).status_code == 401
        r = requests.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                          json={"model": "tiny", "messages": MESSAGES, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == _local_greedy(tiny_model_dir, None, MESSAGES, max_new=4)[0]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
