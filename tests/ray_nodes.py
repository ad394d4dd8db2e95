"""Real Ray nodes for the tests that need a cluster of their own (`ray job submit`, more than one
node): `ray start --block` processes on 127.0.0.1, each in its own process group, on free ports,
with their own temp dir (a `ray start` without one writes /tmp/ray/ray_current_cluster, which other
processes on the machine could then join). Stopping one kills its process group only — never
`ray stop`, which would stop every Ray of the user. Ray 2.60 turns token auth on; the CLI sends
the token (~/.ray/auth_token) only with RAY_AUTH_MODE=token, so every process gets that variable.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def ray_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # not the session's RAY_ADDRESS
    env["RAY_AUTH_MODE"] = "token"
    env["PATH"] = f"{Path(RAY).parent}:{env.get('PATH', '')}"
    env.update(TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")
    return env


class RayNode:
    """One `ray start --block` node. The head gets its own temp dir (worker nodes use the head's)
    and, with ``dashboard``, the job server and state API at ``self.dashboard``."""

    def __init__(self, num_cpus: int = 2, head_gcs: str | None = None, dashboard: bool = False,
                 resources: dict | None = None, temp: str | None = None):
        nm, om, agent, metrics, rte, gcs, dash, client = free_ports(8)
        self.temp = temp or tempfile.mkdtemp(prefix="trn", dir="/tmp")  # short: Unix socket paths are limited
        cmd = [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
               "--node-manager-port", str(nm), "--object-manager-port", str(om),
               "--dashboard-agent-listen-port", str(agent), "--metrics-export-port", str(metrics),
               "--runtime-env-agent-port", str(rte), "--disable-usage-stats"]
        if resources:
            cmd += ["--resources", json.dumps(resources)]
        if head_gcs is None:
            self.gcs = f"127.0.0.1:{gcs}"
            cmd += ["--head", "--port", str(gcs), "--temp-dir", self.temp, "--ray-client-server-port", str(client),
                    "--include-dashboard", "true" if dashboard else "false"]
            if dashboard:
                cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash)]
            self.dashboard = f"http://127.0.0.1:{dash}" if dashboard else None
        else:
            self.gcs, self.dashboard = head_gcs, None
            cmd += ["--address", head_gcs]
        self.log_path = Path(self.temp) / f"node_{nm}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=ray_env(), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_dashboard(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:
                return  # 401 without a token: the dashboard is up
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("ray head did not start: " + self.log_path.read_text()[-2000:])
                time.sleep(1)

    def kill(self, sig=signal.SIGKILL, wait: float = 20) -> None:
        """End this node's process group (raylet, its workers, the head's GCS): a node lost."""
        for s, w in ((sig, wait), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, s)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=w)
                break
            except subprocess.TimeoutExpired:
                pass
        self._log.close()


def wait_nodes(gcs: str, n: int, timeout: float = 120) -> None:
    """Block until the cluster at ``gcs`` has ``n`` live nodes (asked from a fresh process)."""
    code = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = subprocess.run([sys.executable, "-c", code, gcs], env=ray_env(), capture_output=True, text=True, timeout=120)
        if r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(1)
    raise RuntimeError(f"the cluster at {gcs} never had {n} live nodes")


def wait_for_checkpoint(storage, alive, timeout: float = 600.0) -> int:
    """Block until Ray Train has registered a checkpoint of the run ``realign`` in ``storage``
    (every worker reported it: its checkpoint manager's snapshot lists it); returns its step.
    ``alive()`` says whether the run is still going (else: fail at once)."""
    snap = Path(storage) / "realign" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline and alive():
        try:
            done = json.loads(snap.read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):
            done = []
        if done:
            return int(done[-1]["metrics"]["step"])
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint registered in {storage}")


def train_workers(dashboard: str) -> list[dict]:
    """``[{"node_id", "pid"}]`` of the live Ray Train workers of the cluster whose dashboard (state
    API) is at ``dashboard``, asked from a fresh process with the cluster's auth settings."""
    code = ("import json, sys; from ray.util.state import list_actors; print(json.dumps([{'node_id': a.node_id, "
            "'pid': a.pid} for a in list_actors(address=sys.argv[1], filters=[('class_name', '=', 'RayTrainWorker'), "
            "('state', '=', 'ALIVE')])]))")
    r = subprocess.run([sys.executable, "-c", code, dashboard], env=ray_env(), capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])
