"""Load and soak test of ``trace-ray serve`` on 127.0.0.1: mixed traffic from concurrent clients.

    .venv/bin/python benchmarks/serve_load.py                        # 16 clients, load phase + 5-minute soak
    .venv/bin/python benchmarks/serve_load.py --soak-seconds 0       # load phase only

The server is the real command in its own process (and its own local Ray): a tiny LLaMA (hidden
64, 2 layers) with two LoRA adapters, two policies (``hh_harmless_v2``, ``pku_harm_v2``), bearer
auth. Every client cycles through the same mix: a chat completion (base or an adapter, greedy),
a streamed chat completion, a triage of a real HH-RLHF pair with the HH policy, a triage of a real
PKU-SafeRLHF pair (with its labels) with the PKU policy.

- **Load**: ``--requests`` requests in all (capped at ``--duration`` s): requests/s overall and per
  kind, p50/p99 latency (a streamed answer: until its last byte), errors (any non-200, exception or
  stream without ``[DONE]``; must be 0).
- **Soak**: ``--soak-seconds`` of the same traffic; the resident memory (RSS) of the server's
  process tree and of each Serve replica is sampled every ``--sample-s`` seconds. Growth compares
  the mean of the last minute with the mean of the first minute after ``--warmup-s``.

Writes ``benchmarks/results/serve_load.json`` with the load average at start and end (the machine
is shared: absolute figures are pessimistic; compare within a run). Exit status 1 on any error or
memory growth over ``--max-growth``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import HH, SHARED, hh_pairs  # noqa: E402

TEXTS = [
    "How do I bake bread? Mix flour, water and yeast, knead, let it rise, then bake.",
    "I can't help with that request.",
    "Please consult a licensed professional for advice on this topic.",
    "Step 1: gather the tools. Step 2: follow the instructions carefully.",
]
KINDS = ("chat", "chat_stream", "triage_hh", "triage_pku")
REPLICAS = ("Gateway", "HFGenerator", "Triage", "ProxyActor")


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def _stats(lat: list[float], errors: int, wall: float) -> dict:
    return {"requests": len(lat) + errors, "errors": errors, "requests_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(_percentile(lat, 0.50), 1), "p99_ms": round(_percentile(lat, 0.99), 1),
            "mean_ms": round(sum(lat) / max(1, len(lat)), 1)}


def make_model(folder: Path) -> tuple[str, list[str]]:
    """The tiny model and two random LoRA adapters in ``folder/adapters/{a,b}``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trace_ray.models.tiny import build_tiny_llama, build_tokenizer

    tok = build_tokenizer(TEXTS * 4, vocab_size=320)
    model = build_tiny_llama(tok, hidden_size=64, num_layers=2, num_heads=4, seed=0)
    model.save_pretrained(folder / "tiny")
    tok.save_pretrained(folder / "tiny")
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(str(folder / "tiny"))
        peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
        peft.save_pretrained(folder / "adapters" / name)
    return str(folder / "tiny"), ["a", "b"]


def bodies(max_tokens: int) -> dict[str, list[tuple[str, dict]]]:
    """Per kind: (path, body) alternatives that the clients cycle through."""
    chat = [{"model": m, "messages": [{"role": "user", "content": t}], "max_tokens": max_tokens, "temperature": 0}
            for m in ("bench", "bench:a", "bench:b") for t in TEXTS]
    hh = [{"prompt": r["prompt"][-2000:], "chosen": r["chosen"][:2000], "rejected": r["rejected"][:2000],
           "policy": "hh"} for r in hh_pairs(HH, 32)] if HH.exists() else []
    pku_file = SHARED / "data" / "external" / "pku-saferlhf_alpaca7b_test_first50.jsonl"
    pku = []
    if pku_file.exists():
        from trace_ray.data.readers import iter_records

        pku = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "meta": json.loads(r["meta"]),
                "policy": "pku"} for r in iter_records(str(pku_file), "pku") if not r.get("_error")]
    fallback = [{"prompt": TEXTS[i], "chosen": TEXTS[(i + 1) % 4], "rejected": TEXTS[(i + 2) % 4]} for i in range(4)]
    return {"chat": [("/v1/chat/completions", b) for b in chat],
            "chat_stream": [("/v1/chat/completions", {**b, "stream": True}) for b in chat],
            "triage_hh": [("/v1/triage", b) for b in hh or [{**f, "policy": "hh"} for f in fallback]],
            "triage_pku": [("/v1/triage", b) for b in pku or [{**f, "policy": "pku"} for f in fallback]]}


def one(session, url: str, path: str, body: dict, headers: dict) -> tuple[bool, str]:
    """Send one request; a streamed answer is read to its end and must end with [DONE]."""
    try:
        if body.get("stream"):
            with session.post(url + path, json=body, headers=headers, timeout=120, stream=True) as r:
                last = ""
                for line in r.iter_lines(decode_unicode=True):
                    last = line or last
                return r.status_code == 200 and last == "data: [DONE]", f"{r.status_code}: stream ended {last[:80]!r}"
        r = session.post(url + path, json=body, headers=headers, timeout=120)
        return r.status_code == 200, f"{r.status_code}: {r.text[:120]}"
    except Exception as e:  # counted, not raised: the report says how many
        return False, repr(e)[:120]


def drive(url: str, mix: dict, headers: dict, clients: int, total: int | None, seconds: float) -> dict:
    """``clients`` threads cycling through the kinds until ``total`` requests or ``seconds`` pass."""
    import requests

    lat: dict[str, list[float]] = {k: [] for k in KINDS}
    errs: dict[str, int] = {k: 0 for k in KINDS}
    samples: list[str] = []
    lock = threading.Lock()
    counter = iter(range(total if total is not None else 10**12))
    deadline = time.perf_counter() + seconds

    def client(c: int):
        s = requests.Session()
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            kind = KINDS[i % len(KINDS)]
            path, body = mix[kind][i % len(mix[kind])]
            t0 = time.perf_counter()
            ok, msg = one(s, url, path, body, headers)
            dt = (time.perf_counter() - t0) * 1000
            with lock:
                if ok:
                    lat[kind].append(dt)
                else:
                    errs[kind] += 1
                    if len(samples) < 5:
                        samples.append(f"{kind} {msg}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    every = [x for k in KINDS for x in lat[k]]
    return {"wall_s": round(wall, 1), "overall": _stats(every, sum(errs.values()), wall),
            "by_kind": {k: _stats(lat[k], errs[k], wall) for k in KINDS}, "error_samples": samples}


def rss_mb(pid: int) -> dict:
    """Resident memory of the server's process tree, and of each Serve replica / the proxy."""
    import psutil

    total, per = 0, {k: 0 for k in REPLICAS}
    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    for p in procs:
        try:
            rss = p.memory_info().rss
            name = " ".join(p.cmdline()[:1])
        except psutil.Error:
            continue
        total += rss
        for k in REPLICAS:
            if k in name:
                per[k] += rss
    return {"total": round(total / 2**20, 1), **{k: round(v / 2**20, 1) for k, v in per.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument("--requests", type=int, default=800, help="requests in the load phase (default 800)")
    ap.add_argument("--duration", type=float, default=120.0, help="cap of the load phase in seconds (default 120)")
    ap.add_argument("--soak-seconds", type=float, default=300.0, help="length of the soak (default 300; 0 skips it)")
    ap.add_argument("--sample-s", type=float, default=10.0, help="RSS sampling period in the soak (default 10 s)")
    ap.add_argument("--warmup-s", type=float, default=30.0, help="soak time before the first RSS window (default 30 s)")
    ap.add_argument("--max-growth", type=float, default=0.10,
                    help="largest allowed RSS growth, last minute vs first minute (default 0.10 = 10%%)")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each chat completion (default 16)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"),
                    help="JSON report path (default benchmarks/results/serve_load.json)")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.duration <= 0 or args.soak_seconds < 0:
        ap.error("--clients, --requests and --duration must be positive, --soak-seconds >= 0")

    import socket

    import requests

    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    model, _ = make_model(tmp)
    key = "bench-" + os.urandom(8).hex()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    policies = ROOT / "configs" / "policies"
    cmd = [sys.executable, "-m", "trace_ray", "serve", "--model", model, "--served-name", "bench",
           "--adapter", str(tmp / "adapters"), "--policy", f"hh={policies / 'hh_harmless_v2.yaml'}",
           "--policy", f"pku={policies / 'pku_harm_v2.yaml'}", "--port", str(port), "--reload-interval", "0"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"TRACE_API_KEY": key}
    log = open(tmp / "serve.log", "w")
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    report: dict = {}
    try:
        while "trace-ray serve: ready at" not in (tmp / "serve.log").read_text():
            if server.poll() is not None or time.perf_counter() - t0 > 600:
                raise SystemExit("the server did not start:\n" + (tmp / "serve.log").read_text()[-3000:])
            time.sleep(1)
        ready_s = time.perf_counter() - t0
        mix = bodies(args.max_tokens)
        drive(url, mix, headers, 4, 40, 120)  # warm-up, not reported
        load = drive(url, mix, headers, args.clients, args.requests, args.duration)
        print(json.dumps({"load": load}, indent=1), flush=True)
        soak = None
        if args.soak_seconds > 0:
            samples: list[dict] = []
            done = threading.Event()

            def sample():
                start = time.perf_counter()
                while not done.is_set():
                    samples.append({"t_s": round(time.perf_counter() - start, 1), **rss_mb(server.pid)})
                    done.wait(args.sample_s)

            sampler = threading.Thread(target=sample)
            sampler.start()
            traffic = drive(url, mix, headers, args.clients, None, args.soak_seconds)
            done.set()
            sampler.join()
            first = [x for x in samples if args.warmup_s <= x["t_s"] < args.warmup_s + 60]
            last = [x for x in samples if x["t_s"] >= samples[-1]["t_s"] - 60]

            def mean(rows, k):
                return sum(r[k] for r in rows) / max(1, len(rows))

            growth = {k: round(mean(last, k) / mean(first, k) - 1, 4) if mean(first, k) else None
                      for k in ("total",) + REPLICAS}
            soak = {"seconds": args.soak_seconds, "traffic": traffic, "rss_mb_samples": samples,
                    "rss_growth_last_vs_first_minute": growth, "max_growth_allowed": args.max_growth}
        t1 = time.perf_counter()
        server.send_signal(signal.SIGTERM)  # the graceful stop, as an operator does it
        code = server.wait(timeout=180)
        report = {
            "benchmark": "serve_load", "host": "127.0.0.1", "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "ready_s": round(ready_s, 1), "sigterm_to_exit_s": round(time.perf_counter() - t1, 1), "exit_code": code,
            "config": {"model": "tiny-llama(h64,l2) + 2 LoRA adapters", "policies": ["hh_harmless_v2", "pku_harm_v2"],
                       "clients": args.clients, "mix": list(KINDS), "max_tokens": args.max_tokens,
                       "requests": args.requests, "duration_cap_s": args.duration, "auth": "bearer",
                       "server": "trace-ray serve (own process, own local Ray), hf backend, 1 replica each"},
            "load": load, "soak": soak,
        }
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    errors = report["load"]["overall"]["errors"] + (report["soak"]["traffic"]["overall"]["errors"] if report["soak"] else 0)
    grown = report["soak"] and (report["soak"]["rss_growth_last_vs_first_minute"]["total"] or 0) > args.max_growth
    report["total_errors"], report["passed"] = errors, errors == 0 and not grown and report["exit_code"] == 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "soak"} | {"soak_growth": report["soak"] and
                     report["soak"]["rss_growth_last_vs_first_minute"]}, indent=1))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
