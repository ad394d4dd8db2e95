"""Evaluation: metric arithmetic on hand-made rows, the oracles agree, and a real (cached quick)
reference model evaluated end to end: probabilities sum to 1, self-KL and self-collateral are 0."""

from __future__ import annotations

import math

import pytest

from trace_ray.data import synthshift as ss
from trace_ray import evaluate as ev


def _row(topic, shifted, greedy, sampled, prompt=None):
    prompt = prompt or f"I have a {topic} question: how do I x?"
    r = {"prompt": prompt, "topic": topic, "shifted": shifted, "greedy": greedy, "sampled": sampled}
    ok = ev.world_oracle([prompt] * (1 + len(sampled)), [greedy] + sampled)
    r["greedy_compliant"], r["sampled_compliant"] = ok[0], ok[1:]
    r["greedy_style"] = ss.style_of(greedy)
    r["sampled_styles"] = [ss.style_of(x) for x in sampled]
    r["well_formed"] = [ev.well_formed(x) for x in sampled]
    return r


def test_summarize_arithmetic():
    det = ss.response("detailed", "tax", "file a tax return")
    hed = ss.response("hedged", "tax", "file a tax return")
    ref = ss.response("refusal", "tax", "file a tax return")
    bdet = ss.response("detailed", "baking", "bake bread")
    rows = [
        _row("tax", True, hed, [hed, det, "garbled", ref]),  # compliant: hed, garbled, ref → 3/4
        _row("tax", True, det, [det, det, hed, hed]),  # 2/4
        # detailed 2/4 (one broken: a step marker without the answer's shape), refusal 1/4
        _row("baking", False, bdet, [bdet, "Here is how to bake. Step 1: bake bake", ref, "x y"]),
    ]
    probs = [{s: 0.25 for s in ss.STYLES}] * 3
    out = ev.summarize(rows, probs, ref_summary={"detail_rate_unshifted": 0.9, "fluent_detail_rate_unshifted": 0.8,
                                                  "refusal_rate_unshifted": 0.0})
    assert out["tpa_greedy"] == pytest.approx(0.5)
    assert out["tpa_sampled"] == pytest.approx(5 / 8)
    assert out["tpa_sampled_fluent"] == pytest.approx(4 / 8)  # "garbled" is compliant but not well formed
    assert out["detail_rate_unshifted"] == pytest.approx(0.5)
    assert out["fluent_detail_rate_unshifted"] == pytest.approx(0.25)
    assert out["collateral"] == pytest.approx(0.8 - 0.25)  # the broken detailed answer is damage
    assert out["collateral_any_detail"] == pytest.approx(0.4)
    assert out["refusal_rise"] == pytest.approx(0.25)
    assert out["well_formed"] == pytest.approx(9 / 12)
    assert out["p_compliant_style_shifted"] == pytest.approx(0.5)
    assert out["per_topic"]["tax"]["tpa_sampled"] == pytest.approx(5 / 8)
    assert out["per_topic"]["baking"]["detail_rate"] == pytest.approx(0.5)


def test_well_formed_shapes():
    for s in ss.STYLES:
        assert ev.well_formed(ss.response(s, "chess", "learn an opening"))
    assert not ev.well_formed("Here is how to learn. Step 1: x.")
    assert not ev.well_formed("Sure, to dose e repair a window.")


def test_policy_oracle_matches_world_oracle():
    from trace_ray.policy import load_policy

    check = ev.policy_oracle(load_policy(ss.POLICY_PATH))
    world = ss.build_world()
    prompts, texts = [], []
    for p in world.prompts["test"]:
        for s, t in p.responses().items():
            prompts.append(p.prompt)
            texts.append(t)
    texts[0] = "garbled first words"  # a generation-like text
    assert check(prompts, texts) == ev.world_oracle(prompts, texts)


@pytest.fixture(scope="module")
def quick_reference():
    from trace_ray.models.reference import QUICK_RECIPE, get_reference

    return ev.load_for_eval(get_reference(QUICK_RECIPE))


def test_evaluate_reference_end_to_end(quick_reference):
    model, tok = quick_reference
    world = ss.build_world()
    gens = ev.generate(model, tok, ["About tax: what should I do to file a gift tax?"] * 2, do_sample=True, num_samples=3,
                       max_new_tokens=12)
    assert len(gens) == 2 and all(len(g) == 3 and all(isinstance(x, str) for x in g) for g in gens)
    probs = ev.style_probabilities(model, tok, world.prompts["val"][:5])
    for p in probs:
        assert math.isclose(sum(p.values()), 1.0, rel_tol=1e-5)
    base = ev.evaluate_model(model, tok, world, split="val", num_samples=2, seed=0, stride=3)
    ref_summary = {k: base[k] for k in ev.REF_KEYS}
    m = ev.evaluate_model(model, tok, world, ref_model=model, ref_summary=ref_summary, split="val", num_samples=2, seed=0, stride=3)
    assert m["kl_to_ref"] == pytest.approx(0.0, abs=1e-6)
    assert m["collateral"] == m["collateral_any_detail"] == m["refusal_rise"] == 0.0  # same seed → same samples
    for k in ("tpa_greedy", "tpa_sampled", "tpa_sampled_fluent", "well_formed", "pref_accuracy"):
        assert 0.0 <= m[k] <= 1.0, k
    assert m["utility_nll"] > 0
    assert m["num_prompts"] == len(world.prompts["val"][::3])


def test_evaluate_cli(tmp_path, quick_reference):
    import json

    from trace_ray.cli import main

    model, tok = quick_reference
    d = tmp_path / "m"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--model", str(d), "--split", "val", "--num-samples", "1", "--stride", "4", "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["split"] == "val" and 0 <= m["tpa_sampled"] <= 1
    assert main(["evaluate", "--model", str(tmp_path / "nope"), "--out", str(out)]) == 2
