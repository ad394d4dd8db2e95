"""One chat completion through the real serving app (``serve/``, Ray Serve over HTTP).

The pipeline's last stage: deploy the re-aligned model (an adapter folder serves its base too),
ask one OpenAI-format chat completion on 127.0.0.1, record the answer, and remove the app. It
runs on whatever Ray the caller is connected to (a job's cluster, or a local Ray).
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request

APP_NAME = "trace-ray-check"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | None, key: str | None, timeout: float) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")[:500]}


def chat_once(model: str, policy: str | None = None, prompt: str = "Hello!", max_tokens: int = 32,
              timeout_s: int = 300, port: int = 0, settings: dict | None = None) -> dict:
    """Serve ``model`` (and ``policy`` for /v1/triage), send one chat completion, tear down.

    ``settings``: more ``ServeSettings`` fields (``{"hf": {"num_cpus": 0.5}}``, ``{"backend": "vllm"}``).

    Returns ``{"model_id", "prompt", "answer", "finish_reason", "status", "seconds_to_ready",
    "latency_s", "models"}``; raises RuntimeError when the app does not answer 200.
    """
    from ray import serve
    from ray.serve.context import _get_global_client

    from serve.app import build_from_settings
    from serve.settings import ServeSettings
    from trace_ray.config import from_dict

    from trace_ray.config import deep_merge

    settings = from_dict(ServeSettings, deep_merge({"model": model, "policy": policy}, settings or {}))
    key = os.environ.get(settings.api_key_env) or None
    serve.start(http_options={"host": "127.0.0.1", "port": port or free_port()})
    actual_port = _get_global_client().http_config.port  # an already running Serve keeps its port
    base = f"http://127.0.0.1:{actual_port}/{APP_NAME}"
    t0 = time.perf_counter()
    serve.run(build_from_settings(settings, api_key=key), name=APP_NAME, route_prefix=f"/{APP_NAME}")
    ready = time.perf_counter() - t0
    try:
        status, listing = _http("GET", f"{base}/v1/models", None, key, timeout_s)
        if status != 200:
            raise RuntimeError(f"GET /v1/models answered {status}: {listing}")
        ids = [m["id"] for m in listing.get("data", [])]
        model_id = next((i for i in ids if ":" in i), ids[0])  # the adapter when there is one
        body = {"model": model_id, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "temperature": 0.0}
        t1 = time.perf_counter()
        status, answer = _http("POST", f"{base}/v1/chat/completions", body, key, timeout_s)
        latency = time.perf_counter() - t1
        if status != 200:
            raise RuntimeError(f"POST /v1/chat/completions answered {status}: {answer}")
        choice = answer["choices"][0]
        return {"model_id": model_id, "models": ids, "prompt": prompt,
                "answer": choice["message"]["content"], "finish_reason": choice.get("finish_reason"),
                "status": status, "seconds_to_ready": round(ready, 2), "latency_s": round(latency, 3)}
    finally:
        serve.delete(APP_NAME)
