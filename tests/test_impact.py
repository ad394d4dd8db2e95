"""Alignment-impact weights (trace_ray.impact): fast paths vs exact, sign, determinism, normalisation."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import TINY_TEXTS
from trace_ray import losses as L
from trace_ray.impact import (
    build_gold_batch,
    build_score_batch,
    dpo_objective,
    global_gradient,
    impact_scores,
    normalize_weights,
    trainable_params,
)
from trace_ray.logprobs import encode_pairs, sequence_logps

CATS = ["invert", "punish", "retain", "invert", "punish", "unresolved", "invert", "punish"]


def make_records(cats=CATS, seed=0):
    """Pairs of very different lengths, so the batch has plenty of padding."""
    rng = random.Random(seed)
    t = TINY_TEXTS
    return [
        {"id": f"r{i}", "prompt": rng.choice(t)[: rng.randint(5, 40)], "chosen": rng.choice(t)[: rng.randint(3, 70)],
         "rejected": rng.choice(t)[: rng.randint(3, 70)], "category": c,
         "corrected": rng.choice(t)[: rng.randint(3, 30)] if c == "punish" else None}
        for i, c in enumerate(cats)
    ]


def lora(model, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=dropout))
    with torch.no_grad():  # move off B = 0 so LoRA A also gets a gradient
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return m


def setup(tok, model, with_corrected=False):
    recs = make_records()
    g = global_gradient(model, [encode_pairs(tok, build_gold_batch(recs, 6, seed=0), 96)])
    batch = build_score_batch(tok, recs, 96, model=model, with_corrected=with_corrected)
    # policy ≠ reference, as after some training (scores refreshed every K steps)
    batch["ref_logps"] = batch["ref_logps"] + torch.randn(batch["ref_logps"].shape, generator=torch.Generator().manual_seed(3))
    return batch, g


def pearson(a, b):
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


@pytest.mark.parametrize("params", ["full", "lora"])
def test_jvp_and_fd_agree_with_exact(tiny_tokenizer, tiny_model, params):
    """jvp: max relative error ≤ 1e-4 against exact; fd: Pearson r ≥ 0.999; θ bit-exactly restored."""
    model = lora(tiny_model) if params == "lora" else tiny_model
    batch, g = setup(tiny_tokenizer, model, with_corrected=(params == "full"))
    assert (batch["attention_mask"] == 0).any()  # padding present
    before = [p.detach().clone() for p in trainable_params(model)]
    exact = impact_scores(model, batch, g, "exact")
    jvp = impact_scores(model, batch, g, "jvp")
    fd = impact_scores(model, batch, g, "fd")
    active = torch.tensor([c in ("invert", "punish") for c in CATS])
    assert (exact[~active] == 0).all() and (jvp[~active] == 0).all() and (fd[~active] == 0).all()
    assert (exact[active] != 0).all()
    rel = float((jvp - exact).abs().max() / exact.abs().max())
    assert rel <= 1e-4, rel
    assert pearson(fd[active], exact[active]) >= 0.999
    for p, q in zip(trainable_params(model), before):
        assert torch.equal(p, q)
    # micro-batching is a memory knob only
    torch.testing.assert_close(impact_scores(model, batch, g, "jvp", micro_batch=2), jvp, rtol=1e-5, atol=1e-6)


def test_positive_score_means_the_update_helps_J(tiny_tokenizer, tiny_model):
    """Gold batch = one pair (a ≻ b), J = DPO at θ = θ_ref. An invert sample with (y_w, y_l) = (b, a)
    has, reversed, exactly J's loss → its score is ⟨g, g⟩ = ‖g_J‖² > 0; the sample (a, b) has
    reversed loss DPO(b ≻ a), whose gradient at margin 0 is −g → score −‖g_J‖². One SGD step on the
    positive sample lowers J; one on the negative sample raises it."""
    prompt, a, b = "How do I bake bread?", "Mix flour, water and yeast.", "I can't help with that request."
    gold = encode_pairs(tiny_tokenizer, [{"prompt": prompt, "chosen": a, "rejected": b}], 64)
    J = dpo_objective(beta=0.3)
    g = global_gradient(tiny_model, [gold], J=J)
    g2 = sum(float((x * x).sum()) for x in g)
    recs = [{"prompt": prompt, "chosen": b, "rejected": a, "category": "invert"},
            {"prompt": prompt, "chosen": a, "rejected": b, "category": "invert"}]
    batch = build_score_batch(tiny_tokenizer, recs, 64, model=tiny_model)
    for method in ("exact", "jvp"):
        s = impact_scores(tiny_model, batch, g, method)
        torch.testing.assert_close(s, torch.tensor([g2, -g2], dtype=torch.float32), rtol=1e-4, atol=0)
    assert pearson(impact_scores(tiny_model, batch, g, "fd"), torch.tensor([g2, -g2])) > 0.999
    gold["ref_logps"] = sequence_logps(tiny_model, gold).detach()
    j0 = float(J(tiny_model, gold).detach())
    for i, sign in ((0, -1), (1, +1)):
        model = type(tiny_model)(tiny_model.config)
        model.load_state_dict(tiny_model.state_dict())
        sub = encode_pairs(tiny_tokenizer, [recs[i]], 64)
        ref = batch["ref_logps"][[i, i + 2]]
        lp = sequence_logps(model, sub)
        loss = L.invert_loss(lp[:1], lp[1:], ref[:1], ref[1:], 0.3).sum()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(1e-2 * p.grad)
        assert sign * (float(J(model, gold).detach()) - j0) > 0


def test_scores_are_deterministic_in_eval_mode_not_in_train_mode(tiny_tokenizer, tiny_model):
    """LoRA dropout 0.5: scores taken in train mode (the authors' way) differ run to run; ours
    (eval mode, the default) are identical, and the model's training mode is restored."""
    model = lora(tiny_model, dropout=0.5)
    batch, g = setup(tiny_tokenizer, model)
    model.train()
    s1 = impact_scores(model, batch, g, "exact")
    s2 = impact_scores(model, batch, g, "exact")
    assert torch.equal(s1, s2)
    assert torch.equal(impact_scores(model, batch, g, "jvp"), impact_scores(model, batch, g, "jvp"))
    assert model.training
    torch.manual_seed(0)
    t1 = impact_scores(model, batch, g, "exact", eval=False)
    t2 = impact_scores(model, batch, g, "exact", eval=False)
    assert not torch.allclose(t1, t2)


def test_global_gradient_accumulates_as_mean_over_all_pairs(tiny_tokenizer, tiny_model):
    """g over batches of 2 and 1 pairs = (2·∇J_1 + 1·∇J_2)/3 = ∇ of the mean DPO over all 3 pairs."""
    gold = build_gold_batch(make_records(), 3, seed=1)
    assert len(gold) == 3
    whole = global_gradient(tiny_model, [encode_pairs(tiny_tokenizer, gold, 96)])
    parts = global_gradient(tiny_model, [encode_pairs(tiny_tokenizer, gold[:2], 96), encode_pairs(tiny_tokenizer, gold[2:], 96)])
    params = trainable_params(tiny_model)
    assert [tuple(x.shape) for x in whole] == [tuple(p.shape) for p in params]
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # pluggable J: a J that ignores the model gives a zero gradient... through allow_unused
    zero = global_gradient(tiny_model, [encode_pairs(tiny_tokenizer, gold, 96)],
                           J=lambda m, b: sequence_logps(m, b).sum() * 0.0)
    assert all(float(z.abs().sum()) == 0 for z in zero)


def test_build_gold_batch_composition():
    """size 7 → 2 retain (as is), 2 invert (reversed), 3 punish (random compliant winner, original
    y_w as loser); every chosen is a compliant response; same seed → same batch."""
    recs = make_records(["retain"] * 4 + ["invert"] * 4 + ["punish"] * 4 + ["unresolved"] * 2)
    by_id = {r["id"]: r for r in recs}
    gold = build_gold_batch(recs, 7, seed=5)
    assert [g["source_category"] for g in gold] == ["retain"] * 2 + ["invert"] * 2 + ["punish"] * 3
    compliant = {r["chosen"] for r in recs if r["category"] == "retain"} | {r["rejected"] for r in recs if r["category"] == "invert"}
    for g in gold:
        src = by_id[g["source_id"]]
        assert g["prompt"] == src["prompt"] and g["chosen"] in compliant
        if g["source_category"] == "retain":
            assert (g["chosen"], g["rejected"]) == (src["chosen"], src["rejected"])
        elif g["source_category"] == "invert":
            assert (g["chosen"], g["rejected"]) == (src["rejected"], src["chosen"])
        else:
            assert g["rejected"] == src["chosen"]
    assert gold == build_gold_batch(recs, 7, seed=5)
    # short pools are topped up; no compliant response at all → no punish rows
    only_invert = build_gold_batch(recs[4:8], 6, seed=0)
    assert len(only_invert) == 4 and all(g["source_category"] == "invert" for g in only_invert)
    assert build_gold_batch(recs[8:12], 3, seed=0) == []


def test_normalize_weights_closed_forms():
    """s = [2, −1, 1, 0, 5], γ = 2, mask drops row 4: clamp(s/γ) = [1, 0, 0.5, 0] → l1 [2/3, 0, 1/3, 0, 0];
    mean (4 rows average 1) → [8/3, 0, 4/3, 0, 0]. All ≤ 0 → uniform."""
    s = torch.tensor([2.0, -1.0, 1.0, 0.0, 5.0])
    mask = torch.tensor([True, True, True, True, False])
    torch.testing.assert_close(normalize_weights(s, 2.0, "l1", mask), torch.tensor([2 / 3, 0, 1 / 3, 0, 0]))
    torch.testing.assert_close(normalize_weights(s, 2.0, "mean", mask), torch.tensor([8 / 3, 0, 4 / 3, 0, 0]))
    torch.testing.assert_close(normalize_weights(torch.tensor([-1.0, 0.0]), 1.0, "l1"), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="mode"):
        normalize_weights(s, 1.0, "max")


def test_bad_arguments_are_clear_errors(tiny_tokenizer, tiny_model):
    batch, g = setup(tiny_tokenizer, tiny_model)
    with pytest.raises(ValueError, match="method"):
        impact_scores(tiny_model, batch, g, "adjoint")
    with pytest.raises(ValueError, match="g_J"):
        impact_scores(tiny_model, batch, g[:-1], "jvp")


def test_jvp_works_under_sdpa_attention(tiny_tokenizer):
    """The CPU flash SDPA kernel has no forward AD; impact_scores forces the math kernel, so a
    model loaded with the default attn_implementation="sdpa" scores like exact."""
    from trace_ray.models.tiny import build_tiny_llama

    model = build_tiny_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0, attn_implementation="sdpa")
    batch, g = setup(tiny_tokenizer, model)
    exact, jvp = impact_scores(model, batch, g, "exact"), impact_scores(model, batch, g, "jvp")
    assert float((jvp - exact).abs().max() / exact.abs().max()) <= 1e-4


def test_fd_step_rules(tiny_tokenizer, tiny_model):
    """fd_delta (default, ε = δ/‖g‖) and the ‖θ‖ rule (fd_eps) both track exact on the tiny model."""
    batch, g = setup(tiny_tokenizer, tiny_model)
    exact = impact_scores(tiny_model, batch, g, "exact")
    active = exact != 0
    for kw in ({"fd_delta": 0.005}, {"fd_eps": 1e-4}):
        fd = impact_scores(tiny_model, batch, g, "fd", **kw)
        assert pearson(fd[active], exact[active]) >= 0.999, kw


@pytest.mark.parametrize("params", ["full", "lora"])
def test_jvp_in_bf16_tracks_exact(tiny_tokenizer, params):
    """Weights stored in bf16 (model.dtype: bfloat16): jvp scores against exact fp32 scores keep
    r ≥ 0.999 (forward-mode AD has no ±ε difference to lose in rounding). fd in bf16 does not
    (measured r = 0.9989 LoRA, 0.993 full on this kind of model), so the config refuses it."""
    from trace_ray.models.tiny import build_tiny_llama

    def scores(dtype, method):
        model = build_tiny_llama(tiny_tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=0).to(dtype)
        if params == "lora":
            torch.manual_seed(0)
            model = lora(model)
        batch, g = setup(tiny_tokenizer, model)
        return impact_scores(model, batch, g, method)

    exact, jvp = scores(torch.float32, "exact"), scores(torch.bfloat16, "jvp")
    active = exact != 0
    assert pearson(jvp[active], exact[active]) >= 0.999


@pytest.mark.parametrize("params", ["full", "lora"])
def test_at_reference_takes_the_reference_from_the_scoring_pass(tiny_tokenizer, tiny_model, params):
    """At θ = θ_ref (a LoRA adapter at initialisation; a full model before training) the reference
    log-probs are the policy's own: ``at_reference=True`` without ``ref_logps`` gives the scores of
    a separate reference pass — jvp and exact to float precision, fd to its O(ε²)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])) if params == "lora" else tiny_model
    recs = make_records()
    g = global_gradient(model, [encode_pairs(tiny_tokenizer, build_gold_batch(recs, 6, seed=0), 96)])
    with_ref = build_score_batch(tiny_tokenizer, recs, 96, model=model)
    bare = build_score_batch(tiny_tokenizer, recs, 96)
    assert "ref_logps" not in bare
    for method, tol in (("exact", 1e-5), ("jvp", 1e-5), ("fd", 5e-3)):
        want = impact_scores(model, with_ref, g, method)
        got = impact_scores(model, bare, g, method, at_reference=True)
        rel = float((got - want).abs().max() / want.abs().max())
        assert rel <= tol, (method, rel)
