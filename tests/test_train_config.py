"""RunConfig: strict types, choices, cross-field rules, input checks before any worker starts."""

from __future__ import annotations

import pytest
import yaml

from trace_ray.config import ConfigError, from_dict
from trace_ray.train.config import RunConfig, load_run_config
from trace_ray.train.data import balanced_bounds
from trace_ray.train.config import used_categories
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
        ("loss.retain_nll=-1", "loss.retain_nll"),  # negative weight
        ("method=dpo", "method"),  # not a choice
        ("backend.kind=fsdp", "backend.kind"),
        ("backend.zero_stage=4", "backend.zero_stage"),
        ("reference.mode=shared", "reference.mode"),
        ("impact.normalize=l2", "impact.normalize"),
        ("model.lora.r=0", "model.lora.r"),
        ("backend.deepspeed.optimizer.type=Adam", "backend.deepspeed.optimizer"),
        ("model.lora.enabled=false", "reference.mode"),  # adapter_disabled needs LoRA
        ("method=npo_all", "impact.weights"),  # impact weights score TRACE's own losses
        ("backend.max_failures=-2", "backend.max_failures"),
        ("backend.min_workers=3", "backend.min_workers"),  # more than num_workers
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("backend.placement_strategy=RANDOM", "backend.placement_strategy"),
        ("backend.deepspeed.bf16.enabled=true", "backend.deepspeed.bf16"),  # precision has one place
    ],
)
def test_bad_values_name_the_field(tmp_path, triaged, tiny_model_dir, override, field):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(run_dict(tiny_model_dir, triaged, tmp_path / "out")))
    with pytest.raises(ConfigError) as e:
        load_run_config(p, [override])
    assert field in str(e.value)


@pytest.mark.parametrize(
    "overrides, field",
    [
        # DeepSpeed's ZeRO checkpoints are tied to the number of workers: no fewer after a loss
        (["backend.kind=deepspeed", "backend.num_workers=2", "backend.min_workers=1"], "backend.min_workers"),
        # fd's ±ε differences drown in bf16 rounding: fp32 parameters only
        (["model.dtype=bfloat16"], "impact.method"),
        # mixed precision keeps fp32 master weights: not with bf16 weights under ddp
        (["model.dtype=bfloat16", "impact.method=jvp", "train.mixed_precision=bf16"], "train.mixed_precision"),
        # DeepSpeed trains bf16 weights only in its bf16 mode
        (["backend.kind=deepspeed", "model.dtype=bfloat16", "impact.method=jvp"], "train.mixed_precision"),
        (["model.attn_implementation=flash_attention_2", "impact.method=jvp"], "impact.method"),
        # a refresh would score J against the moving θ: no reference model in the trainer
        (["model.lora.enabled=false", "reference.mode=precomputed", "loss.alpha_kl=0", "impact.refresh_every=2"],
         "impact.refresh_every"),
    ],
)
def test_cross_field_rules_name_the_field(tmp_path, triaged, tiny_model_dir, overrides, field):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(run_dict(tiny_model_dir, triaged, tmp_path / "out")))
    with pytest.raises(ConfigError) as e:
        load_run_config(p, overrides)
    assert f"{field}:" in str(e.value)


def test_precision_settings_that_are_accepted(tmp_path, triaged, tiny_model_dir):
    """bf16 mixed precision: autocast under ddp with fp32 weights; DeepSpeed's bf16 mode (with
    weights loaded in bf16 or fp32); jvp under sdpa (the math kernel is forced); a refresh with a
    frozen copy (the KL needs one) or LoRA."""
    from trace_ray.train.build import deepspeed_config

    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(run_dict(tiny_model_dir, triaged, tmp_path / "out")))
    assert load_run_config(p, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    for dtype in ("bfloat16", "float32"):
        cfg = load_run_config(p, ["backend.kind=deepspeed", f"model.dtype={dtype}", "train.mixed_precision=bf16",
                                  "impact.method=jvp", "model.attn_implementation=sdpa"])
        assert deepspeed_config(cfg, 2)["bf16"] == {"enabled": True}
    assert "bf16" not in deepspeed_config(load_run_config(p, ["backend.kind=deepspeed"]), 2)
    load_run_config(p, ["model.lora.enabled=false", "reference.mode=precomputed", "impact.refresh_every=2"])
    load_run_config(p, ["impact.refresh_every=2"])


@pytest.mark.parametrize("alpha_kl, retain_nll, loaded", [(0.1, 0.0, True), (0.0, 1.0, True), (0.0, 0.0, False)])
def test_retain_rows_load_when_either_retain_term_is_on(tmp_path, triaged, tiny_model_dir, alpha_kl, retain_nll, loaded):
    """The data path keeps retain rows for the KL anchor *or* the retain NLL (else none carry a loss)."""
    d = run_dict(tiny_model_dir, triaged, tmp_path / "out", loss={"alpha_kl": alpha_kl, "retain_nll": retain_nll})
    assert ("retain" in used_categories(from_dict(RunConfig, d))) is loaded


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
    assert info["duplicate_ids"] == 0


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
    assert plan["steps_per_epoch"] == 2 and plan["total_steps"] == 6 and plan["offsets"] == [0, 9]
    assert balanced_bounds(17, 2) == [9] and balanced_bounds(10, 3) == [4, 7] and balanced_bounds(5, 1) == []


def test_resume_refuses_a_different_config(tmp_path):
    from trace_ray.train.run import _write_config

    base = {"data": {"triaged": "t"}, "model": {"name": "m"}, "output": {"dir": str(tmp_path)}}
    _write_config(from_dict(RunConfig, base), tmp_path, has_checkpoints=False)
    same = dict(base, logging={"progress": False}, train={"log_every": 5})  # free to change on resume
    _write_config(from_dict(RunConfig, same), tmp_path, has_checkpoints=True)
    with pytest.raises(ConfigError, match="optim.lr"):
        _write_config(from_dict(RunConfig, dict(base, optim={"lr": 1e-3})), tmp_path, has_checkpoints=True)


def test_output_storage_path_for_multi_node_checkpoints(tmp_path):
    """``output.storage_path``: None keeps Ray Train's checkpoints in OUT/ray_train; a bucket URI
    or a (NFS) path is used as is (local paths made absolute on the driver); bad values name it."""
    from trace_ray.train.run import checkpoint_storage, has_checkpoints, resolve_paths

    base = {"data": {"triaged": "t"}, "model": {"name": "m"}, "output": {"dir": str(tmp_path / "out")}}
    cfg = from_dict(RunConfig, base)
    assert cfg.output.storage_path is None
    assert checkpoint_storage(cfg, tmp_path / "out") == str(tmp_path / "out" / "ray_train")
    for uri in ("s3://bucket/runs/q/ray_train", "gs://b/x", "file:///mnt/nfs/ckpt"):
        c = from_dict(RunConfig, dict(base, output={"dir": "o", "storage_path": uri}))
        assert checkpoint_storage(resolve_paths(c), tmp_path) == uri
    c = resolve_paths(from_dict(RunConfig, dict(base, output={"dir": "o", "storage_path": "rel/ckpt"})))
    assert c.output.storage_path.startswith("/") and c.output.storage_path.endswith("rel/ckpt")
    for bad, needle in (("", "empty"), ("  ", "empty"), ("ftp://host/x", "unknown scheme"), ("s3://", "no bucket"),
                        (3, "output.storage_path")):
        with pytest.raises(ConfigError, match=needle) as e:
            from_dict(RunConfig, dict(base, output={"dir": "o", "storage_path": bad}))
        assert "output.storage_path" in str(e.value)
    # the resume guard looks for checkpoints where Ray Train writes them
    nfs = tmp_path / "nfs"
    assert not has_checkpoints(str(nfs))
    (nfs / "realign" / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    assert has_checkpoints(str(nfs)) and has_checkpoints(f"file://{nfs}")
    # ... and compares the config they were made with from there, even from a fresh OUT
    from trace_ray.train.run import _write_config

    c = from_dict(RunConfig, dict(base, output={"dir": str(tmp_path / "a"), "storage_path": str(nfs)}))
    (tmp_path / "a").mkdir()
    _write_config(c, tmp_path / "a", has_checkpoints=True, shared=str(nfs))
    assert (nfs / "run_config.yaml").exists()
    (tmp_path / "b").mkdir()
    other = from_dict(RunConfig, dict(base, optim={"lr": 1e-3}, output={"dir": str(tmp_path / "b"), "storage_path": str(nfs)}))
    with pytest.raises(ConfigError, match=r"output.storage_path: .* optim.lr"):
        _write_config(other, tmp_path / "b", has_checkpoints=True, shared=str(nfs))
