"""Real Ray Train runs on CPU (few: each costs a worker-group start): 2 workers over gloo
(``ddp``) and DeepSpeed ZeRO-2 with 2 workers, each compared with the in-process single worker
using 2 accumulation steps (the same global batch), plus kill-after-checkpoint and resume."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from train_data import run_dict, write_triaged

LN2 = math.log(2.0)
BETA = 0.3


def _lines(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _compare(ray_out, local, rtol):
    a, b = _lines(ray_out), local["metrics"]
    assert [l["step"] for l in a] == [l["step"] for l in b]
    for x, y in zip(a, b):
        for k in ("loss", "L_I", "L_II", "L_KL", "raw_L_I", "raw_L_II", "w_mean"):
            if y[k] is None:
                assert x[k] is None
            else:
                assert x[k] == pytest.approx(y[k], rel=rtol, abs=1e-7), (k, x["step"])
    mine = {n: p.detach() for n, p in local["model"].named_parameters() if p.requires_grad}
    theirs = _adapter(ray_out)
    assert len(theirs) == len(mine)
    for n, t in theirs.items():
        key = next(k for k in mine if k.replace(".default", "").endswith(n.split("base_model.model.", 1)[-1]))
        torch.testing.assert_close(t, mine[key], rtol=rtol * 10, atol=1e-5)


def test_ddp_two_workers_equal_one_worker_with_accumulation(ray_session, tiny_model_dir, tmp_path):
    """2 workers × batch 4 == 1 worker × batch 4 × 2 accumulation steps, step by step, impact
    weights included (g_J all-reduced, each worker scoring its shard); the first loss is the
    closed form Σ w_i·L_i / 8 at policy = reference; parameters move; per-category losses drop."""
    from trace_ray.train import realign, train_local

    tri = write_triaged(tmp_path / "t.parquet")  # 4 invert, 2 punish, 2 retain, 1 unresolved
    common = dict(impact={"method": "jvp", "gold_size": 6, "batch_size": 4}, optim={"lr": 2e-2})
    summary = realign(run_dict(tiny_model_dir, tri, tmp_path / "ray", backend={"num_workers": 2},
                               train={"batch_size": 4, "max_steps": 3}, **common))
    assert summary["rows_trained"] == 8 and summary["workers"] == 2
    local = train_local(run_dict(tiny_model_dir, tri, tmp_path / "loc", train={"batch_size": 4, "grad_accum": 2, "max_steps": 3}, **common))
    _compare(tmp_path / "ray", local, rtol=1e-4)

    w = pq.read_table(tmp_path / "ray" / "weights.parquet").to_pydict()
    cat = {r["id"]: r["category"] for r in pq.read_table(tri).to_pylist()}
    per = {"invert": LN2, "punish": 2 * (2 / BETA) * LN2}
    first = _lines(tmp_path / "ray")[0]
    assert first["loss"] == pytest.approx(sum(x * per[cat[i]] for i, x in zip(w["id"], w["weight"])) / 8, rel=1e-5)
    assert first["raw_L_I"] == pytest.approx(LN2, rel=1e-6) and first["L_KL"] == pytest.approx(0.0, abs=1e-7)
    last = _lines(tmp_path / "ray")[-1]
    assert last["raw_L_I"] < first["raw_L_I"] and last["raw_L_II"] < first["raw_L_II"]
    assert max(float(t.abs().max()) for n, t in _adapter(tmp_path / "ray").items() if "lora_B" in n) > 0


def test_deepspeed_zero2_two_workers_kill_and_resume(ray_session, tiny_model_dir, tmp_path):
    """DeepSpeed ZeRO-2, 2 CPU workers: killed right after the step-2 checkpoint, the same command
    resumes from it and ends where an uninterrupted (in-process, accumulation 2) run ends. The
    progress bar is on (Ray's tqdm on the workers, started at the resumed step). Checkpoints go to
    ``output.storage_path`` (a folder standing for the NFS/bucket of a multi-node cluster)."""
    from trace_ray.train import realign, train_local

    tri = write_triaged(tmp_path / "t.parquet")
    common = dict(impact={"method": "jvp", "gold_size": 6, "batch_size": 4}, optim={"lr": 2e-2})
    cfg = run_dict(tiny_model_dir, tri, tmp_path / "ds", backend={"num_workers": 2, "kind": "deepspeed", "zero_stage": 2},
                   train={"batch_size": 4, "max_steps": 4, "checkpoint_every": 2}, logging={"progress": True},
                   output={"storage_path": str(tmp_path / "nfs")}, **common)
    with pytest.raises(Exception, match="injected failure"):
        realign(cfg, fail_at_step=2)
    assert not (tmp_path / "ds" / "adapter").exists()
    assert list((tmp_path / "nfs" / "realign").glob("checkpoint_*")) and not (tmp_path / "ds" / "ray_train").exists()
    assert [l["step"] for l in _lines(tmp_path / "ds")] == [1, 2]
    realign(cfg)  # resumes from the step-2 checkpoint
    local = train_local(run_dict(tiny_model_dir, tri, tmp_path / "loc", train={"batch_size": 4, "grad_accum": 2, "max_steps": 4}, **common))
    _compare(tmp_path / "ds", local, rtol=1e-4)


@pytest.mark.slow
def test_deepspeed_zero3_two_workers(ray_session, tiny_model_dir, tmp_path):
    """ZeRO-3 (parameters sharded; every rank must run the same forwards, even when its micro-batch
    has no row of some category): 2 CPU workers, LoRA, equal to the in-process run; the gathered
    adapter is saved and loads."""
    from trace_ray.models.load import load_model
    from trace_ray.train import realign, train_local

    tri = write_triaged(tmp_path / "t.parquet")  # worker 0 gets only invert rows, worker 1 the rest
    common = dict(impact={"method": "jvp", "gold_size": 6, "batch_size": 4}, optim={"lr": 2e-2})
    realign(run_dict(tiny_model_dir, tri, tmp_path / "z3", backend={"num_workers": 2, "kind": "deepspeed", "zero_stage": 3},
                     train={"batch_size": 4, "max_steps": 2}, **common))
    local = train_local(run_dict(tiny_model_dir, tri, tmp_path / "loc", train={"batch_size": 4, "grad_accum": 2, "max_steps": 2}, **common))
    _compare(tmp_path / "z3", local, rtol=1e-4)
    assert type(load_model(str(tmp_path / "z3" / "adapter"))).__name__.startswith("Peft")
