"""Running the real ``trace-ray serve`` command for the serving tests, and the adapters they serve.

Each server is its own process group (``start_new_session``) with its own local Ray; ``stop``
signals only that group. Adapters are trained here with ``trace_ray.train.train_local`` on rows
triaged by a real policy, so the run config beside each adapter names that policy, as a
``trace-ray realign`` output does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(args: list[str], log_path: Path, key: str | None = None) -> tuple[subprocess.Popen, str]:
    """``trace-ray serve ARGS --port <free>`` in a new process group; returns (process, base URL)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TRACE_API_KEY")}
    if key:
        env["TRACE_API_KEY"] = key
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "trace_ray", "serve", *args, "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    """Until the command says it is ready (every deployment up) and /healthz answers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, Path(proc.log_path).read_text()[-4000:]
        try:
            if ("trace-ray serve: ready at" in Path(proc.log_path).read_text()
                    and requests.get(url + "/healthz", timeout=10).status_code == 200):
                return
        except requests.RequestException:  # not listening yet, or busy starting
            pass
        time.sleep(1)
    raise AssertionError(f"not ready after {timeout} s:\n" + Path(proc.log_path).read_text()[-4000:])


def stop(proc: subprocess.Popen, sig=signal.SIGINT, timeout: float = 90) -> int:
    """Signal the server's process group (only it) and wait; SIGKILL the group if it hangs."""
    try:
        os.killpg(proc.pid, sig)
        return proc.wait(timeout=timeout)
    except ProcessLookupError:
        return proc.wait()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def descendants(pid: int) -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process(pid).children(recursive=True)}


def sse(r) -> list:
    events = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def random_adapter(base_dir, out_dir, seed: int):
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


def realigned_adapter(base_dir, policy_path, records: list[dict], out_dir: Path) -> Path:
    """Triage ``records`` with the policy, train 2 steps in-process; returns ``out_dir/adapter``
    (``out_dir/run_config.yaml`` → the triaged Parquet → the policy's fingerprint)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from train_data import run_dict
    from trace_ray.data.schema import TRIAGED
    from trace_ray.policy import load_policy
    from trace_ray.train import train_local
    from trace_ray.triage import triage_records

    rows = triage_records(load_policy(policy_path), records)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=TRIAGED), out_dir / "triaged.parquet")
    res = train_local(run_dict(base_dir, out_dir / "triaged.parquet", out_dir, optim={"lr": 5e-2}), progress=False)
    return Path(res["outputs"]["adapter"])
