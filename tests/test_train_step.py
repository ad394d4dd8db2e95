"""The training step and the in-process loop (``train_local``): closed forms at policy = reference,
invariance of the weighted loss under regrouping, resume, outputs. No Ray here."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trace_ray.config import from_dict
from trace_ray.train.config import RunConfig
from trace_ray.train.step import StepSettings, collate, compute_loss, stats_tensor, summarize, tensor_stats

from train_data import run_dict, triaged_rows, write_triaged

LN2 = math.log(2.0)
BETA = 0.3


def lora(model, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def rows(**kw):
    return [r for r in triaged_rows(**kw) if r["category"] != "unresolved"]


@pytest.mark.parametrize("method", ["trace", "naive_dpo", "npo_all"])
def test_first_loss_is_the_closed_form_at_policy_equal_reference(tiny_model, tiny_tokenizer, method):
    """At θ = θ_ref (LoRA B = 0) every log-ratio is 0: reversed DPO = ln 2, dual NPO = 2·(2/β)·ln 2,
    NPO on y_w = (2/β)·ln 2, KL = 0; the loss is Σ_i w_i·L_i / B."""
    model = lora(tiny_model)
    recs = rows()  # 4 invert, 2 punish, 2 retain
    w = [0.5, 1.0, 2.0, 0.0, 1.5, 0.25, 1.0, 1.0]
    for r, x in zip(recs, w):
        r["weight"] = x
    s = StepSettings(method=method, beta=BETA, alpha_kl=0.1, nominal_batch=len(recs), max_length=64)
    loss, st = compute_loss(model, collate(tiny_tokenizer, recs, s), s)
    inv_w, pun_w = sum(w[:4]), sum(w[4:6])
    per = {"trace": (LN2, 2 * (2 / BETA) * LN2), "naive_dpo": (LN2, LN2), "npo_all": ((2 / BETA) * LN2,) * 2}[method]
    expected = (inv_w * per[0] + pun_w * per[1]) / len(recs)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert st["L_KL_sum"] == pytest.approx(0.0, abs=1e-6) and st["n_retain"] == 2


def test_nll_anchor_and_precomputed_reference(tiny_model, tiny_tokenizer, tiny_model_dir):
    """λ·NLL(y_l)/|y_l| is added to each invert row (checked against a plain full-softmax forward);
    precomputed reference columns give the same loss as the adapter-disabled base."""
    from trace_ray.logprobs import encode_pairs
    from trace_ray.train.passes import ReferenceLogps

    import pandas as pd

    model = lora(tiny_model)
    recs = rows(n_invert=2, n_punish=0, n_retain=0)
    s = StepSettings(beta=BETA, alpha_kl=0.0, nll_anchor=1.0, nominal_batch=2, max_length=64)
    loss, _ = compute_loss(model, collate(tiny_tokenizer, recs, s), s)
    enc = encode_pairs(tiny_tokenizer, recs, 64)
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, enc["input_ids"][:, 1:, None]).squeeze(-1)
    m = enc["loss_mask"][:, 1:].double()
    nll = -(lp * m).sum(-1) / m.sum(-1)  # per-token NLL of every row
    expected = (2 * LN2 + nll[2] + nll[3]) / 2  # rows 2, 3 = the rejected (now winning) responses
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)

    df = ReferenceLogps(str(tiny_model_dir), "float32", "eager", 64)(pd.DataFrame(recs))
    pre = df.to_dict("records")
    s2 = StepSettings(beta=BETA, alpha_kl=0.0, nll_anchor=1.0, nominal_batch=2, max_length=64, reference_mode="precomputed")
    loss2, _ = compute_loss(model, collate(tiny_tokenizer, pre, s2), s2)
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)


def test_retain_nll_adds_per_token_nll_of_retained_answers(tiny_model, tiny_tokenizer):
    """μ·NLL(y_w)/|y_w| of every retain row is added (checked against a plain full-softmax
    forward), on top of the KL (0 at θ = θ_ref); preference rows are untouched by it."""
    from trace_ray.logprobs import encode_pairs

    model = lora(tiny_model)
    recs = rows(n_invert=1, n_punish=0, n_retain=2)
    base = StepSettings(beta=BETA, alpha_kl=0.1, nominal_batch=3, max_length=64)
    with_rt = StepSettings(beta=BETA, alpha_kl=0.1, retain_nll=2.0, nominal_batch=3, max_length=64)
    l0, _ = compute_loss(model, collate(tiny_tokenizer, recs, base), base)
    l1, st = compute_loss(model, collate(tiny_tokenizer, recs, with_rt), with_rt)
    ret = [r for r in recs if r["category"] == "retain"]
    enc = encode_pairs(tiny_tokenizer, ret, 64)
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, enc["input_ids"][:, 1:, None]).squeeze(-1)
    m = enc["loss_mask"][:, 1:].double()
    nll = (-(lp * m).sum(-1) / m.sum(-1))[: len(ret)]  # the chosen rows
    assert float(l0) == pytest.approx(LN2 / 3, rel=1e-5)
    assert float(l1 - l0) == pytest.approx(float(2.0 * nll.sum() / 3), rel=1e-5)
    assert st["L_retain_nll_sum"] == pytest.approx(float(2.0 * nll.sum()), rel=1e-5) and st["n_retain"] == 2
    logged = summarize(tensor_stats(stats_tensor(st)), 3)  # the all-reduce round trip keeps it
    assert logged["L_retain_nll"] == pytest.approx(float(2.0 * nll.mean()), rel=1e-5)
    # without the KL the retain rows still run for the NLL term
    only = StepSettings(beta=BETA, alpha_kl=0.0, retain_nll=2.0, nominal_batch=3, max_length=64)
    l2, _ = compute_loss(model, collate(tiny_tokenizer, recs, only), only)
    assert float(l2) == pytest.approx(float(l1), rel=1e-5)


def test_regrouping_invariance_zero_weight_and_padding(tiny_model, tiny_tokenizer):
    """One micro-batch of 4 == the mean of two micro-batches of 2 (gradients too): what makes
    2 workers × 1 step equal 1 worker × 2 accumulation steps. A zero weight and a padding row
    contribute nothing."""
    model = lora(tiny_model)
    with torch.no_grad():  # move off θ_ref so that KL and the log-ratios are non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    recs = rows(n_invert=2, n_punish=1, n_retain=1)
    for i, r in enumerate(recs):
        r["weight"] = [0.7, 1.3, 2.0, 1.0][i]
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(groups, B):
        s = StepSettings(beta=BETA, alpha_kl=0.5, nominal_batch=B, max_length=64)
        for p in params:
            p.grad = None
        total = 0.0
        for g in groups:
            loss, _ = compute_loss(model, collate(tiny_tokenizer, g, s), s)
            (loss / len(groups)).backward()
            total += float(loss) / len(groups)
        return total, [p.grad.clone() for p in params]

    l1, g1 = grads([recs], 4)
    l2, g2 = grads([[recs[0], recs[3]], [recs[2], recs[1]]], 2)
    assert l1 == pytest.approx(l2, rel=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)

    zero = [dict(recs[0], weight=0.0)]
    s = StepSettings(beta=BETA, alpha_kl=0.5, nominal_batch=1, max_length=64)
    loss, _ = compute_loss(model, collate(tiny_tokenizer, zero, s), s)
    for p in params:
        p.grad = None
    loss.backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in params)
    pad, _ = compute_loss(model, collate(tiny_tokenizer, [dict(recs[0], _pad=True)], s), s)
    assert float(pad) == 0.0


def test_impact_pass_equals_normalize_weights(tiny_tokenizer, tiny_model_dir, tmp_path):
    """The distributed impact pass (world 1 here) gives impact.normalize_weights(impact_scores),
    punish rows scored on NPO without 2/β; so the weights are the same with loss.npo_normalize on
    or off (a weight does not grow with a constant factor of its loss)."""
    from trace_ray.impact import build_gold_batch, build_score_batch, dpo_objective, global_gradient, impact_scores, normalize_weights
    from trace_ray.logprobs import encode_pairs, reference_logps
    from trace_ray.train.build import build_model
    from trace_ray.train.env import LocalEnv
    from trace_ray.train.passes import impact_pass

    tri = write_triaged(tmp_path / "t.parquet")
    cfg = from_dict(RunConfig, run_dict(tiny_model_dir, tri, tmp_path / "o", impact={"method": "jvp", "normalize": "mean"}))
    tok, model, _ = build_model(cfg)
    recs = [dict(r, _row=i) for i, r in enumerate(rows())]
    gold = build_gold_batch(triaged_rows(), 6, 0)
    w = impact_pass(cfg, model, tok, recs, gold, LocalEnv(tmp_path))
    cfg.loss.npo_normalize = False
    assert impact_pass(cfg, model, tok, recs, gold, LocalEnv(tmp_path)) == w
    gb = encode_pairs(tok, gold, 64)
    gb["ref_logps"] = reference_logps(model, gb)
    g = global_gradient(model, [gb], J=dpo_objective(BETA))
    pref = [r for r in recs if r["category"] in ("invert", "punish")]
    sb = build_score_batch(tok, pref, 64, model=model)
    expected = normalize_weights(impact_scores(model, sb, g, "jvp", beta=BETA, npo_normalize=False), mode="mean")
    assert not torch.allclose(expected, normalize_weights(impact_scores(model, sb, g, "jvp", beta=BETA), mode="mean"))
    assert all(w[r["_row"]][0] == r["id"] for r in pref)
    got = torch.tensor([w[r["_row"]][1] for r in pref])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert got.mean() == pytest.approx(1.0, rel=1e-5)


def test_impact_pass_at_reference_runs_no_reference_forward(tiny_model_dir, tmp_path, monkeypatch):
    """Before the first step (θ = θ_ref) the pass takes the reference log-probs from the passes
    that score the policy: the same weights as with a reference forward, and none is run (jvp;
    fd scores against a reference forward, its fused reference being approximate)."""
    import trace_ray.impact as impact_mod
    import trace_ray.logprobs as logprobs_mod
    from trace_ray.impact import build_gold_batch
    from trace_ray.train.build import build_model
    from trace_ray.train.env import LocalEnv
    from trace_ray.train.passes import impact_pass

    tri = write_triaged(tmp_path / "t.parquet")
    cfg = from_dict(RunConfig, run_dict(tiny_model_dir, tri, tmp_path / "o", impact={"method": "jvp", "normalize": "mean"}))
    tok, model, _ = build_model(cfg)
    recs = [dict(r, _row=i) for i, r in enumerate(rows())]
    gold = build_gold_batch(triaged_rows(), 6, 0)
    calls = []
    original = logprobs_mod.reference_logps

    def counted(*a, **k):
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(logprobs_mod, "reference_logps", counted)
    monkeypatch.setattr(impact_mod, "reference_logps", counted)
    w = impact_pass(cfg, model, tok, recs, gold, LocalEnv(tmp_path))
    assert calls  # the general pass runs reference forwards (gold batch and scored rows)
    calls.clear()
    fused = impact_pass(cfg, model, tok, recs, gold, LocalEnv(tmp_path), at_reference=True)
    assert not calls
    assert fused.keys() == w.keys() and all(fused[k][0] == w[k][0] for k in w)
    torch.testing.assert_close(torch.tensor([fused[k][1] for k in w]), torch.tensor([w[k][1] for k in w]),
                               rtol=1e-4, atol=1e-6)
    cfg.impact.method = "fd"  # its fused reference is exact to O(ε²) only: scores keep a reference forward
    calls.clear()
    impact_pass(cfg, model, tok, recs, gold, LocalEnv(tmp_path), at_reference=True)
    assert calls


def test_train_local_learns_saves_and_resumes(tiny_model_dir, tmp_path):
    """Parameters move, the per-category (unweighted) losses go down, the outputs load with
    transformers/peft; a run stopped after a checkpoint and restarted ends where an
    uninterrupted one ends."""
    from transformers import AutoModelForCausalLM

    from trace_ray.models.load import load_model
    from trace_ray.train import train_local

    tri = write_triaged(tmp_path / "t.parquet")
    over = dict(train={"max_steps": 8, "batch_size": 8, "checkpoint_every": 4}, optim={"lr": 2e-2},
                impact={"method": "jvp"}, output={"merge_adapter": True})
    res = train_local(run_dict(tiny_model_dir, tri, tmp_path / "a", **over))
    m = res["metrics"]
    assert len(m) == 8 and m[0]["raw_L_I"] == pytest.approx(LN2, rel=1e-5)
    assert m[-1]["raw_L_I"] < m[0]["raw_L_I"] and m[-1]["raw_L_II"] < m[0]["raw_L_II"]
    lines = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 9))
    moved = [float(p.abs().max()) for n, p in res["model"].named_parameters() if "lora_B" in n]
    assert max(moved) > 0  # B starts at 0
    peft_model = load_model(str(tmp_path / "a" / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "model")
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "a" / "weights.parquet").num_rows == 6

    over["output"] = {"merge_adapter": False}
    with pytest.raises(RuntimeError, match="injected failure"):
        train_local(run_dict(tiny_model_dir, tri, tmp_path / "b", **over), fail_at_step=4)
    res_b = train_local(run_dict(tiny_model_dir, tri, tmp_path / "b", **over))
    assert [round(l["loss"], 5) for l in res_b["metrics"]] == [round(l["loss"], 5) for l in m]
    pa_ = {n: p for n, p in res["model"].named_parameters() if p.requires_grad}
    for n, p in res_b["model"].named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, pa_[n], rtol=1e-5, atol=1e-6)


def test_corrected_pass_and_loss(tiny_model_dir, tmp_path):
    """The y_c pass keeps only oracle-compliant corrections for punish rows; the trainer then uses
    DPO(y_c ≻ y_w) + DPO(y_c ≻ y_l) for them: 2·ln 2 per row at policy = reference."""
    import pandas as pd

    from trace_ray.train import train_local
    from trace_ray.train.corrected import CorrectedResponses

    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "name: test\nversion: '1'\ndescription: Never say the forbidden word.\nmode: any\n"
        "rules:\n  - name: forbidden\n    kind: keywords\n    keywords: [zyzzyva]\n"
    )
    recs = triaged_rows(n_invert=1, n_punish=2, n_retain=1, n_unresolved=0)
    gen = CorrectedResponses(str(tiny_model_dir), str(policy), "Follow: {policy}", max_new_tokens=8, temperature=0.0)
    df = gen(pd.DataFrame(recs))
    got = df["corrected"].tolist()
    assert [isinstance(c, str) and bool(c) for c in got] == [r["category"] == "punish" for r in recs]  # compliant y_c for punish only

    tri = write_triaged(tmp_path / "t.parquet", n_invert=1, n_punish=2, n_retain=0, n_unresolved=0)
    cfg = run_dict(tiny_model_dir, tri, tmp_path / "o", loss={"alpha_kl": 0.0},
                   corrected={"enabled": True, "policy": str(policy), "max_new_tokens": 8},
                   impact={"weights": "uniform"}, train={"batch_size": 3, "max_steps": 1},
                   logging={"progress": False, "tensorboard": True})
    first = train_local(cfg)["metrics"][0]
    assert first["L_II"] == pytest.approx(2 * LN2, rel=1e-5) and first["L_I"] == pytest.approx(LN2, rel=1e-5)
    assert any((tmp_path / "o" / "tensorboard").iterdir())


def test_fewer_workers_than_shards_is_the_same_run(tiny_model_dir, tmp_path):
    """A worker running the shards of a missing worker (backend.min_workers: the run goes on with
    fewer) does the arithmetic of the full world: the 2 shards of a 2-worker run on one worker
    equal the in-process run with 2 accumulation steps, step by step."""
    from trace_ray.train import train_local
    from trace_ray.train.env import LocalEnv
    from trace_ray.train.loop import run_worker, virtual_ranks
    from trace_ray.train.run import gold_records, make_plan

    assert virtual_ranks(0, 1, 2) == [0, 1] and virtual_ranks(1, 2, 4) == [1, 3] and virtual_ranks(0, 2, 2) == [0]
    tri = write_triaged(tmp_path / "t.parquet")
    common = dict(impact={"method": "jvp"}, optim={"lr": 2e-2})
    ref = train_local(run_dict(tiny_model_dir, tri, tmp_path / "loc", train={"batch_size": 4, "grad_accum": 2, "max_steps": 3}, **common))
    cfg = from_dict(RunConfig, run_dict(tiny_model_dir, tri, tmp_path / "two", train={"batch_size": 4, "max_steps": 3}, **common))
    recs = rows()
    plan = make_plan(cfg, len(recs), 2, tmp_path / "two")
    cut = plan["offsets"][1]
    res = run_worker(cfg, plan, {0: recs[:cut], 1: recs[cut:]}, gold_records(cfg), LocalEnv(tmp_path / "two", progress=False))
    for a, b in zip(res["metrics"], ref["metrics"]):
        for k in ("loss", "L_I", "L_II", "L_KL", "w_mean", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), (k, a["step"])
    mine = dict(ref["model"].named_parameters())
    for n, p in res["model"].named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, mine[n], rtol=1e-4, atol=1e-6)


def test_duplicate_ids_keep_their_own_weights(tiny_model_dir, tmp_path):
    """Two different preference rows under one id (a non-unique source id column) each get their
    own impact weight (weights are keyed by row position); check_inputs counts them; a row left
    without a weight is an error, never a silent 1.0."""
    import pyarrow.parquet as pq

    from trace_ray.train import train_local
    from trace_ray.train.loop import _attach
    from trace_ray.train.run import check_inputs

    from train_data import write_rows

    recs = triaged_rows(n_invert=3, n_punish=2, n_retain=1, n_unresolved=0)
    recs[1]["id"] = recs[0]["id"]  # two invert rows, different texts, one id
    recs[4]["id"] = recs[3]["id"]  # and two punish rows
    tri = write_rows(tmp_path / "dup.parquet", recs)
    cfg = run_dict(tiny_model_dir, tri, tmp_path / "o", impact={"method": "jvp", "normalize": "l1"}, train={"max_steps": 1})
    assert check_inputs(from_dict(RunConfig, cfg))["duplicate_ids"] == 2
    with pytest.warns(UserWarning, match="share an id"):
        res = train_local(cfg)
    w = pq.read_table(tmp_path / "o" / "weights.parquet").to_pydict()
    assert w["row"] == [0, 1, 2, 3, 4] and w["id"][0] == w["id"][1] and w["id"][3] == w["id"][4]
    assert w["weight"][0] != w["weight"][1] and w["weight"][3] != w["weight"][4]
    assert sum(w["weight"]) == pytest.approx(1.0, rel=1e-5)  # l1 over all five rows
    assert len(res["weights"]) == 5
    with pytest.raises(ValueError, match="no.*weight|none for row"):
        _attach([dict(recs[0], _row=7)], res["weights"])


def test_checkpoint_rng_state_covers_python_numpy_and_torch():
    """Exact resume: the checkpoint's RNG state restores torch, Python's random and NumPy (and
    every CUDA device where there is one: tests/test_real_model.py's GPU marker covers that)."""
    import random

    import numpy as np

    from trace_ray.train.save import rng_state, set_rng_state

    state = rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    for _ in range(3):
        random.random(), np.random.rand(), torch.rand(1)
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a
    assert ("cuda" in state) == torch.cuda.is_available()


@pytest.mark.gpu
def test_checkpoint_rng_state_covers_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from trace_ray.train.save import rng_state, set_rng_state

    state = rng_state()
    a = torch.rand(4, device="cuda")
    torch.rand(4, device="cuda")
    set_rng_state(state)
    torch.testing.assert_close(torch.rand(4, device="cuda"), a)


def test_bf16_mixed_precision_tracks_fp32(tiny_model_dir, tmp_path):
    """train.mixed_precision=bf16 (autocast, fp32 master weights): the loss curve of 12 steps stays
    within 0.5 % of the fp32 run's (measured: see docs/training.md), the weights stay fp32, and the
    impact weights are identical (scored in fp32, outside autocast)."""
    from trace_ray.train import train_local

    tri = write_triaged(tmp_path / "t.parquet")
    common = dict(impact={"method": "jvp"}, optim={"lr": 1e-2})
    fp32 = train_local(run_dict(tiny_model_dir, tri, tmp_path / "fp32", train={"max_steps": 12, "batch_size": 8}, **common))
    mixed = train_local(run_dict(tiny_model_dir, tri, tmp_path / "bf16", **common,
                                 train={"max_steps": 12, "batch_size": 8, "mixed_precision": "bf16"}))
    assert mixed["weights"] == fp32["weights"]
    assert all(p.dtype == torch.float32 for p in mixed["model"].parameters())
    a, b = [l["loss"] for l in fp32["metrics"]], [l["loss"] for l in mixed["metrics"]]
    rel = [abs(x - y) / abs(x) for x, y in zip(a, b)]
    assert max(rel) <= 0.005, rel  # measured 0.075 % (docs/training.md)
    assert a != b  # bf16 compute really ran
    assert b[-1] < b[0]
