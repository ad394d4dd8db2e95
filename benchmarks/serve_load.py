"""Load test of the Serve app on 127.0.0.1: bounded concurrent clients against /v1/triage (rules)
and /v1/chat/completions (a tiny model, batched with @serve.batch).

    .venv/bin/python benchmarks/serve_load.py                      # tiny model, hh_harmless_v2 rules
    .venv/bin/python benchmarks/serve_load.py --clients 16 --requests 400 --max-tokens 32

Each route gets ``--requests`` requests from ``--clients`` threads (keep-alive sessions), stopped
early at ``--duration`` seconds. Writes requests/s, p50/p99/mean latency and the error count
(any non-200 or exception; must be 0) to ``benchmarks/results/serve_load.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXTS = [
    "How do I bake bread? Mix flour, water and yeast, knead, let it rise, then bake.",
    "I can't help with that request.",
    "Please consult a licensed professional for advice on this topic.",
    "Step 1: gather the tools. Step 2: follow the instructions carefully.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model(folder: Path) -> str:
    from trace_ray.models.tiny import build_tiny_llama, build_tokenizer

    tok = build_tokenizer(TEXTS * 4, vocab_size=320)
    model = build_tiny_llama(tok, hidden_size=64, num_layers=2, num_heads=4, seed=0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _triage_items(n: int) -> list[dict]:
    hh = ROOT.parent / "shared" / "data" / "external" / "hh-rlhf_harmless-base_test.jsonl.gz"
    if hh.exists():
        from trace_ray.data.readers import iter_records

        rows = []
        for r in iter_records(hh, "hh"):
            if not r.get("_error"):
                rows.append({"prompt": r["prompt"][-2000:], "chosen": r["chosen"][:2000], "rejected": r["rejected"][:2000]})
            if len(rows) >= n:
                break
        return rows
    return [{"prompt": TEXTS[i % 4], "chosen": TEXTS[(i + 1) % 4], "rejected": TEXTS[(i + 2) % 4]} for i in range(n)]


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))
    return xs[k]


def run_route(url: str, bodies: list[dict], clients: int, total: int, duration_s: float, headers: dict) -> dict:
    import requests

    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(total))
    deadline = time.perf_counter() + duration_s

    def client():
        s = requests.Session()
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                r = s.post(url, json=bodies[i % len(bodies)], headers=headers, timeout=120)
                ok = r.status_code == 200
                msg = f"{r.status_code}: {r.text[:120]}"
            except Exception as e:  # counted, not raised: the report says how many
                ok, msg = False, repr(e)[:120]
            dt = (time.perf_counter() - t0) * 1000
            with lock:
                lat.append(dt) if ok else errors.append(msg)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    return {"requests": len(lat) + len(errors), "errors": len(errors), "error_samples": errors[:3],
            "wall_s": round(wall, 3), "requests_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(_percentile(lat, 0.50), 2), "p99_ms": round(_percentile(lat, 0.99), 2),
            "mean_ms": round(sum(lat) / max(1, len(lat)), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model to serve (default: a fresh tiny LLaMA, hidden 64, 2 layers)")
    ap.add_argument("--policy", default=str(ROOT / "configs" / "policies" / "hh_harmless_v2.yaml"),
                    help="rules-only policy for /v1/triage (default: configs/policies/hh_harmless_v2.yaml)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent client threads per route (default 8)")
    ap.add_argument("--requests", type=int, default=200, help="requests per route (default 200)")
    ap.add_argument("--duration", type=float, default=60.0, help="stop a route after this many seconds (default 60)")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each chat completion (default 16)")
    ap.add_argument("--max-batch-size", type=int, default=8, help="@serve.batch size of the generator (default 8)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"),
                    help="JSON report path (default benchmarks/results/serve_load.json)")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.duration <= 0:
        ap.error("--clients, --requests and --duration must be positive")

    import ray
    from ray import serve

    from serve.app import build_from_settings
    from serve.settings import ServeSettings
    from trace_ray.config import from_dict

    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    model = args.model or _tiny_model(tmp / "tiny")
    key = "bench-" + os.urandom(8).hex()
    settings = from_dict(ServeSettings, {"model": model, "policy": args.policy, "served_name": "bench",
                                         "hf": {"max_batch_size": args.max_batch_size}})
    app = build_from_settings(settings, api_key=key)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.perf_counter()
    serve.run(app, name="serve-load", route_prefix="/")
    ready_s = time.perf_counter() - t0
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    chat = [{"model": "bench", "messages": [{"role": "user", "content": t}], "max_tokens": args.max_tokens,
             "temperature": 0} for t in TEXTS]
    triage = _triage_items(64)
    try:
        run_route(base + "/v1/chat/completions", chat, 2, 4, 30, headers)  # warm-up, not reported
        run_route(base + "/v1/triage", triage, 2, 4, 30, headers)
        results = {
            "triage": run_route(base + "/v1/triage", triage, args.clients, args.requests, args.duration, headers),
            "chat_completions": run_route(base + "/v1/chat/completions", chat, args.clients, args.requests,
                                          args.duration, headers),
        }
    finally:
        serve.shutdown()
        ray.shutdown()
    report = {
        "benchmark": "serve_load", "host": "127.0.0.1", "cpus": os.cpu_count(), "python": platform.python_version(),
        "ready_s": round(ready_s, 2),
        "config": {"model": "tiny-llama(h64,l2)" if not args.model else args.model, "policy": Path(args.policy).name,
                   "clients": args.clients, "requests_per_route": args.requests, "duration_cap_s": args.duration,
                   "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size, "auth": "bearer"},
        "results": results,
        "total_errors": sum(r["errors"] for r in results.values()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if report["total_errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
