"""RunConfig: strict types, choices, cross-field rules, input checks before any worker starts."""

from __future__ import annotations

import pytest
import yaml

from trace_ray.config import ConfigError, from_dict
from trace_ray.train.config import RunConfig, load_run_config
from trace_ray.train.data import balanced_bounds
from trace_ray.train.run import check_inputs, make_plan

from train_data import run_dict, write_triaged


@pytest.fixture()
def triaged(tmp_path):
    return write_triaged(tmp_path / "triaged.parquet")


def test_defaults_and_yaml_round_trip(tmp_path, triaged, tiny_model_dir):
    d = run_dict(tiny_model_dir, triaged, tmp_path / "out")
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(d))
    cfg = load_run_config(p, ["loss.beta=0.1", "method=naive_dpo", "impact.weights=uniform", "optim.lr=1e-4"])
    assert cfg.loss.beta == 0.1 and cfg.method == "naive_dpo" and cfg.optim.lr == 1e-4
    assert cfg.loss.nll_anchor == 0.0 and cfg.loss.npo_normalize is True  # the paper's defaults
    assert cfg.reference.mode == "adapter_disabled" and cfg.backend.kind == "ddp"


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.batchsize=4", "train.batchsize"),  # unknown key
        ("train.batch_size=four", "train.batch_size"),  # wrong type
        ("loss.beta=true", "loss.beta"),
        ("method=dpo", "method"),  # not a choice
        ("backend.kind=fsdp", "backend.kind"),
        ("backend.zero_stage=4", "backend.zero_stage"),
        ("reference.mode=shared", "reference.mode"),
        ("impact.normalize=l2", "impact.normalize"),
        ("model.lora.r=0", "model.lora.r"),
        ("backend.deepspeed.optimizer.type=Adam", "backend.deepspeed.optimizer"),
        ("model.lora.enabled=false", "reference.mode"),  # adapter_disabled needs LoRA
        ("method=npo_all", "impact.weights"),  # impact weights score TRACE's own losses
    ],
)
def test_bad_values_name_the_field(tmp_path, triaged, tiny_model_dir, override, field):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(run_dict(tiny_model_dir, triaged, tmp_path / "out")))
    with pytest.raises(ConfigError) as e:
        load_run_config(p, [override])
    assert field in str(e.value)


def test_required_fields():
    with pytest.raises(ConfigError, match="data.triaged"):
        from_dict(RunConfig, {"model": {"name": "x"}, "output": {"dir": "o"}})
    with pytest.raises(ConfigError, match="output.dir"):
        from_dict(RunConfig, {"data": {"triaged": "t"}, "model": {"name": "x"}})


def test_missing_or_wrong_inputs_fail_before_workers(tmp_path, triaged, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trace_ray.train import realign

    d = run_dict(tiny_model_dir, tmp_path / "nope.parquet", tmp_path / "out")
    with pytest.raises(ConfigError, match="data.triaged"):
        realign(d)  # raises from check_inputs: no Ray, no worker, no output folder
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["x"], "chosen": ["y"]}), bad)
    with pytest.raises(ConfigError, match="lacks column"):
        check_inputs(from_dict(RunConfig, run_dict(tiny_model_dir, bad, tmp_path / "out")))
    with pytest.raises(ConfigError, match="model.name"):
        check_inputs(from_dict(RunConfig, run_dict(tmp_path / "no_model", triaged, tmp_path / "out")))
    only_retain = write_triaged(tmp_path / "r.parquet", n_invert=0, n_punish=0)
    with pytest.raises(ConfigError, match="no invert or punish"):
        check_inputs(from_dict(RunConfig, run_dict(tiny_model_dir, only_retain, tmp_path / "out")))
    info = check_inputs(from_dict(RunConfig, run_dict(tiny_model_dir, triaged, tmp_path / "out")))
    assert info["counts"] == {"invert": 4, "punish": 2, "retain": 2, "unresolved": 1} and info["rows"] == 8


def test_cli_bad_config_exits_2_naming_the_field(tmp_path, triaged, tiny_model_dir, capsys):
    from trace_ray.cli import main

    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(run_dict(tiny_model_dir, triaged, tmp_path / "out")))
    assert main(["realign", "--config", str(p), "train.epochs=zero"]) == 2
    assert "train.epochs" in capsys.readouterr().err
    assert main(["realign", "--config", str(p), "--check"]) == 0


def test_plan_and_split():
    cfg = from_dict(RunConfig, {"data": {"triaged": "t"}, "model": {"name": "m"}, "output": {"dir": "o"},
                                "train": {"batch_size": 4, "grad_accum": 2, "epochs": 3}})
    plan = make_plan(cfg, n_rows=17, world=2, out_dir="o")
    # 9 rows on the larger worker, 8 per optimizer step → 2 steps per epoch, 6 in all
    assert plan["steps_per_epoch"] == 2 and plan["total_steps"] == 6
    assert balanced_bounds(17, 2) == [9] and balanced_bounds(10, 3) == [4, 7] and balanced_bounds(5, 1) == []


def test_resume_refuses_a_different_config(tmp_path):
    from trace_ray.train.run import _write_config

    base = {"data": {"triaged": "t"}, "model": {"name": "m"}, "output": {"dir": str(tmp_path)}}
    _write_config(from_dict(RunConfig, base), tmp_path, has_checkpoints=False)
    same = dict(base, logging={"progress": False}, train={"log_every": 5})  # free to change on resume
    _write_config(from_dict(RunConfig, same), tmp_path, has_checkpoints=True)
    with pytest.raises(ConfigError, match="optim.lr"):
        _write_config(from_dict(RunConfig, dict(base, optim={"lr": 1e-3})), tmp_path, has_checkpoints=True)
