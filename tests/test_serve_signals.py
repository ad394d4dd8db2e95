"""Stopping ``trace-ray serve`` as an operator does: SIGTERM (systemd, Kubernetes) to the process,
SIGINT (Ctrl-C) to its whole process group, each while a long streamed answer is in flight. The
answer finishes, new requests are refused (503) meanwhile, Serve and the local Ray go away, and
the process exits 0. Before that, a client that leaves mid-answer: its generation stops. Each test starts its own short-lived server (only its own group is signalled).

The model is the shared 1-layer GPT-2 with its 50k-token vocabulary: a greedy answer of 1,000
tokens (no EOS on this prompt) takes a few seconds on CPU, long enough to be in flight.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import SHARED
from serve_helpers import descendants, start_serve, wait_ready

pytestmark = pytest.mark.slow  # two servers of their own (~25 s each on a quiet 2-core box)

MODEL = SHARED / "models" / "fake_gpt2_lm_buddy"
BODY = {"prompt": "Tell me a long story.", "max_tokens": 1000, "temperature": 0, "stream": True, "n": 2,
        "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("sig,group", [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["SIGTERM", "SIGINT-group"])
def test_signal_drains_in_flight_requests_and_exits_0(tmp_path, sig, group):
    import os

    proc, url = start_serve(["--model", str(MODEL), "--served-name", "gpt", "--grace-period", "60",
                             "--set", "limits.max_tokens=1000", "--set", "hf.num_cpus=0.5"], tmp_path / "serve.log")
    log = Path(proc.log_path)
    try:
        wait_ready(proc, url)
        children = descendants(proc.pid)
        assert children  # the local Ray: GCS, raylet, workers (replicas)
        # a client that goes away mid-answer stops its generation: the next request need not wait for
        # it, and the server logs no traceback for it (left at three depths: the cancel races the stream)
        for depth in (1, 2, 4):
            with requests.post(url + "/v1/completions", json=BODY, stream=True, timeout=120) as r:
                lines = r.iter_lines()
                for _ in range(depth):
                    next(lines)
        t_left = time.time()
        assert requests.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=120).status_code == 200
        after_leaving = time.time() - t_left
        got: dict = {}
        first_chunk = threading.Event()

        def stream():
            with requests.post(url + "/v1/completions", json=BODY, stream=True, timeout=120) as r:
                got["status"] = r.status_code
                lines = []
                for line in r.iter_lines(decode_unicode=True):
                    lines.append(line)
                    first_chunk.set()
                got["chunks"] = [line for line in lines if line.startswith("data: ")]

        t = threading.Thread(target=stream)
        t_stream = time.time()
        t.start()
        assert first_chunk.wait(120), log.read_text()[-3000:]
        t0 = time.time()
        (os.killpg if group else os.kill)(proc.pid, sig)
        # new requests are refused while the answer in flight goes on
        refused = None
        while time.time() - t0 < 60 and refused is None:
            try:
                r = requests.get(url + "/healthz", timeout=5)
                if r.status_code == 503:
                    refused = requests.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
            except requests.RequestException:
                break  # already gone: the check below on the log says whether the answer was in flight
            time.sleep(0.05)
        t.join(120)
        t_stream = time.time() - t_stream
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert code == 0, text[-3000:]
    import re

    drained = re.search(rf"{sig.name} received: not taking new requests; (\d+) in flight", text)
    assert drained and int(drained.group(1)) >= 1, text[-3000:]  # the answer was in flight when it drained
    assert refused is not None and refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert "shutting down" in refused.json()["error"]["message"]
    # the answer in flight ran to its end: both choices, every token, then [DONE]
    assert got["status"] == 200 and got["chunks"][-1] == "data: [DONE]"
    import json

    events = [json.loads(c[6:]) for c in got["chunks"][:-1]]
    assert events[-1]["usage"]["completion_tokens"] == 2000
    assert sorted(e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]) \
        == ["length", "length"]
    assert "trace-ray serve: stopped" in text and "Traceback" not in text
    assert after_leaving < t_stream / 2, (after_leaving, t_stream)  # the abandoned answer did not run to its end
    import psutil

    def running(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.time() + 30  # Serve and the local Ray are gone with it
    alive = children
    while alive and time.time() < deadline:
        alive = {p for p in children if running(p)}
        time.sleep(0.5)
    assert not alive, f"left running: {alive}"
