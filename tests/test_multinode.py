"""More than one Ray node (issue 14 item 4): a head and a worker node (`ray start` processes on
127.0.0.1, their own resources, tests/ray_nodes.py), the pipeline job's driver on the head as
`ray job submit` would run it. Each node has one CPU, as a GPU node has its GPUs: triage runs on
the cluster's Ray Data; realign runs 2 Ray Train workers, one per node (SPREAD), with
`output.storage_path` checkpoints in a folder both nodes reach (standing for NFS/a bucket). After a
registered checkpoint the worker node is killed (its raylet and its worker): with
`backend.min_workers: 1` Ray Train restarts the run with the one worker the head can hold, which
then runs both shards, and the run ends equal to the single-node result. (Ray Train sizes an
elastic restart by free resources only, not by the placement strategy: with STRICT_SPREAD and room
for two workers on the head it would retry two forever.)"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT
from ray_nodes import RayNode, ray_env, train_workers, wait_for_checkpoint, wait_nodes


@pytest.mark.slow
def test_two_nodes_triage_and_training_survive_losing_a_node(tmp_path, tiny_model_dir, pku_path):
    from safetensors.torch import load_file

    from trace_ray.data.readers import iter_records
    from trace_ray.policy import load_policy
    from trace_ray.train import train_local
    from trace_ray.triage import triage_records

    head = RayNode(num_cpus=1, dashboard=True, resources={"head_node": 1})
    worker = None
    try:
        head.wait_dashboard()
        worker = RayNode(num_cpus=1, head_gcs=head.gcs, resources={"worker_node": 1})
        wait_nodes(head.gcs, 2)
        out, nfs = tmp_path / "run", tmp_path / "nfs"
        policy = ROOT / "configs" / "policies" / "pku_harm_v2.yaml"
        realign = {
            "model": {"name": str(tiny_model_dir), "lora": {"enabled": True, "r": 4, "alpha": 8}},
            "impact": {"weights": "impact", "method": "jvp", "gold_size": 6, "batch_size": 8},
            # 8 rows: each worker's shard is one micro-batch of 4, so every step sees all rows and the
            # in-process run with 2 accumulation steps is the same run (tests/test_train_ray.py)
            "optim": {"lr": 2e-2}, "data": {"max_length": 96, "limit": 8}, "logging": {"progress": False},
        }
        cfg = tmp_path / "pipeline.yaml"
        cfg.write_text(json.dumps({
            "name": "multinode", "data": str(pku_path), "format": "pku", "policy": str(policy), "out": str(out),
            "stages": ["triage", "realign"], "triage": {"pku_chosen": "better"},
            "realign": dict(realign, train={"batch_size": 4, "max_steps": 8, "checkpoint_every": 2},
                            backend={"num_workers": 2, "min_workers": 1, "max_failures": 2,
                                     "placement_strategy": "SPREAD"},
                            output={"storage_path": str(nfs)}),
        }))
        env = dict(ray_env(), PYTHONPATH=str(ROOT))
        log = open(tmp_path / "driver.log", "w")
        driver = subprocess.Popen([sys.executable, "jobs/pipeline.py", "--address", head.gcs, "--config", str(cfg)],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        # the two workers run on the two nodes
        deadline = time.time() + 300
        while len(workers := train_workers(head.dashboard)) < 2:
            assert driver.poll() is None and time.time() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.5)
        assert len({w["node_id"] for w in workers}) == 2
        at = wait_for_checkpoint(nfs, lambda: driver.poll() is None)
        worker.kill()  # the worker node is lost: its raylet and its Ray Train worker
        assert driver.wait(timeout=900) == 0, (tmp_path / "driver.log").read_text()[-4000:]
        log.close()
    finally:
        for node in (worker, head):
            if node is not None:
                node.kill(signal.SIGTERM)
        shutil.rmtree(head.temp, ignore_errors=True)

    # triage on the cluster = triage in this process, row for row
    table = pq.read_table(out / "triage" / "triaged.parquet").to_pylist()
    want = triage_records(load_policy(policy), list(iter_records(pku_path, "pku", pku_chosen="better")))
    assert sorted((r["id"], r["category"]) for r in table) == sorted((r["id"], r["category"]) for r in want)
    # training: resumed after the loss, on one worker, and equal to the single-node run
    summary = json.loads((out / "realign" / "summary.json").read_text())
    assert at < 8 and summary["resumed_from"] and summary["resumed_from"][0] >= at
    assert list(nfs.glob("realign/checkpoint_*"))
    local = train_local(dict(realign, data=dict(realign["data"], triaged=str(out / "triage" / "triaged.parquet")),
                             train={"batch_size": 4, "grad_accum": 2, "max_steps": 8}, output={"dir": str(tmp_path / "loc")}))
    lines = [json.loads(l) for l in (out / "realign" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 9))
    for a, b in zip(lines, local["metrics"]):
        for k in ("loss", "L_I", "L_II", "L_KL", "w_mean"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), (k, a["step"])
    mine = {n: p.detach() for n, p in local["model"].named_parameters() if p.requires_grad}
    for n, t in load_file(str(out / "realign" / "adapter" / "adapter_model.safetensors")).items():
        key = next(k for k in mine if k.replace(".default", "").endswith(n.split("base_model.model.", 1)[-1]))
        torch.testing.assert_close(t, mine[key], rtol=1e-3, atol=1e-5)
