"""The held-out split and evaluation on it: triage of the 2,312 real HH-RLHF pairs with
``--holdout`` / ``--validation`` (disjoint, stable, by prompt), then ``evaluate`` on the held-out
split with the shared tiny GPT-2 (the real GPT-2 tokenizer)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from conftest import SHARED
from test_triage import HH_POLICY, hh_bad
from trace_ray.config import ConfigError
from trace_ray.data.readers import iter_records

GPT2 = SHARED / "models" / "fake_gpt2_lm_buddy"
HOLDOUT, VALIDATION = 0.1, 0.05


def _u(prompt: str) -> float:
    """The split hash written out: sha256 of the salted prompt, first 8 bytes as a fraction."""
    d = hashlib.sha256(b"trace-ray/split/v1\x1f" + prompt.encode()).digest()
    return int.from_bytes(d[:8], "big") / 2**64


@pytest.fixture(scope="module")
def hh_split(ray_session, hh_path, tmp_path_factory):
    from trace_ray.triage import run_triage

    out = tmp_path_factory.mktemp("hh_split")
    summary = run_triage(hh_path, HH_POLICY, out, holdout=HOLDOUT, validation=VALIDATION, show_progress=False)
    return out, summary


def _ids(path):
    return pq.read_table(path, columns=["id"]).column("id").to_pylist()


def test_split_is_disjoint_grouped_by_prompt_and_stable(hh_split, hh_path, tmp_path):
    from trace_ray.triage import run_triage

    out, summary = hh_split
    recs = list(iter_records(hh_path))
    want = {}
    for r in recs:  # the split each row must land in, from the raw rows
        u = _u(r["prompt"]) if r["prompt"] else _u(f"id:{r['id']}")
        want[r["id"]] = "heldout" if u < HOLDOUT else "validation" if u < HOLDOUT + VALIDATION else "train"
    got = {}
    for split, name in (("train", "triaged.parquet"), ("validation", "validation.parquet"), ("heldout", "heldout.parquet")):
        for i in _ids(out / name):
            assert i not in got, f"{i} in two splits"
            got[i] = split
    assert got == want and len(got) == len(recs) == summary["total"] == 2312
    sides = {}
    for r in recs:
        sides.setdefault(r["prompt"], set()).add(want[r["id"]])
    assert all(len(s) == 1 for s in sides.values())  # a prompt never straddles the split
    n = Counter(want.values())
    assert abs(n["heldout"] / 2312 - HOLDOUT) < 0.03 and abs(n["validation"] / 2312 - VALIDATION) < 0.02
    for split, name in (("train", "triaged.parquet"), ("heldout", "heldout.parquet")):
        cats = Counter(pq.read_table(out / name, columns=["category"]).column("category").to_pylist())
        assert summary["splits"][split] == {"total": n[split], "counts": {c: cats[c] for c in summary["counts"]}}
    # another run, other batching, a larger held-out fraction: the held-out rows only grow
    run_triage(hh_path, HH_POLICY, tmp_path, holdout=0.2, batch_size=300, show_progress=False)
    assert set(_ids(out / "heldout.parquet")) < set(_ids(tmp_path / "heldout.parquet"))
    assert not (tmp_path / "validation.parquet").exists()


def test_bad_fractions_and_held_out_training_are_refused(hh_split, tmp_path):
    from trace_ray.config import from_dict
    from trace_ray.pipeline import PipelineConfig
    from trace_ray.stages import validate
    from trace_ray.train.config import RunConfig
    from trace_ray.train.run import check_inputs
    from trace_ray.triage import run_triage

    with pytest.raises(ValueError, match=r"--holdout: a fraction in \[0, 1\), got 1.5"):
        run_triage("nope.jsonl", HH_POLICY, tmp_path / "o", holdout=1.5)
    with pytest.raises(ValueError, match="must leave rows to train on"):
        run_triage("nope.jsonl", HH_POLICY, tmp_path / "o", holdout=0.6, validation=0.5)
    out, _ = hh_split
    cfg = from_dict(RunConfig, {"data": {"triaged": str(out / "heldout.parquet")}, "model": {"name": str(GPT2)},
                                "output": {"dir": str(tmp_path / "r")}})
    with pytest.raises(ConfigError, match="is the heldout split, which is never trained on"):
        check_inputs(cfg)
    pipe = from_dict(PipelineConfig, {"out": "o", "data": "d", "policy": str(HH_POLICY), "realign": {"model": {"name": "m"}}})
    with pytest.raises(ConfigError, match="set triage.holdout"):
        validate(pipe)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A random LoRA adapter on the tiny GPT-2 (its reference: the base with the adapter disabled)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(str(GPT2)),
                       LoraConfig(r=4, lora_alpha=64, target_modules=["c_attn"], init_lora_weights=False))
    m.save_pretrained(d)
    AutoTokenizer.from_pretrained(str(GPT2)).save_pretrained(d)
    return d


EVAL = ["--limit", "40", "--max-prompts", "3", "--num-samples", "2", "--max-new-tokens", "6",
        "--max-length", "96", "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def evaluated(hh_split, adapter, tmp_path_factory):
    """``trace-ray evaluate`` of the adapter on the held-out split (a triage output folder as --data)."""
    from trace_ray.cli import main

    path = tmp_path_factory.mktemp("eval") / "metrics.json"
    assert main(["evaluate", "--model", str(adapter), "--data", str(hh_split[0]), "--policy", str(HH_POLICY),
                 "--out", str(path)] + EVAL) == 0
    return path


def test_evaluate_on_held_out_real_pairs(hh_split, adapter, evaluated, tmp_path):
    from trace_ray.cli import main
    from trace_ray.evaluate_pairs import evaluate_pairs

    out, _ = hh_split
    # the training table is refused: an in-sample number is not a result
    assert main(["evaluate", "--model", str(adapter), "--data", str(out / "triaged.parquet"),
                 "--policy", str(HH_POLICY), "--out", str(tmp_path / "x.json")] + EVAL) == 2
    assert not (tmp_path / "x.json").exists()
    m = json.loads(evaluated.read_text())
    rows = pq.read_table(out / "heldout.parquet").to_pylist()[:40]
    assert m["split"] == "heldout" and not m["in_sample"] and m["rows"] == 40
    assert m["counts"] == {c: sum(r["category"] == c for r in rows) for c in m["counts"]}
    assert m["reference"] == "adapter_disabled"
    # TPA and refusals recomputed from the model's own greedy answers, with the policy written out
    # in stdlib re and the refusal detector as the output states it
    import re

    gens = m["generations"]
    conflict = [g for g in gens if g["category"] == "conflict"]
    retain = [g for g in gens if g["category"] == "retain"]
    n_conflict = len({r["prompt"] for r in rows if r["category"] in ("invert", "punish")})
    assert len(conflict) == m["tpa"]["prompts"] == min(3, n_conflict) > 0 and len(retain) == 3
    assert m["tpa_greedy"] == pytest.approx(sum(not hh_bad(g["greedy"]) for g in conflict) / len(conflict))
    detector = re.compile(m["refusal"]["detector"], re.I)
    assert m["refusal"]["greedy"] == pytest.approx(
        sum(bool(detector.search(g["greedy"][:300])) for g in retain) / len(retain))
    for k in ("tpa_sampled", "refusal_rate", "pref_accuracy"):
        assert 0.0 <= m[k] <= 1.0
    assert m["kl_to_ref"] > 0 and m["utility_nll"] > 0  # the random adapter moved the model
    # the adapter-disabled reference equals the base model scored on its own
    base = evaluate_pairs(str(GPT2), str(out / "heldout.parquet"), limit=40, max_length=96, batch_size=16,
                          show_progress=False)
    assert base["utility_nll"] == pytest.approx(m["utility"]["reference_nll_per_token"], rel=1e-5)
    assert base["pref_accuracy"] == pytest.approx(m["preference"]["reference"]["accuracy"])
    assert base["reference"] is None and base["kl_to_ref"] is None and "tpa" not in base
    # --max-scored: only the first N rows of each set are scored (and said so)
    few = evaluate_pairs(str(GPT2), str(out / "heldout.parquet"), limit=40, max_length=96, batch_size=16,
                         show_progress=False, max_scored=2)
    n_inv = min(2, sum(r["category"] == "invert" for r in rows))
    assert few["utility"]["rows"] == 2 and few["preference"]["pairs"] == n_inv + 2 < base["preference"]["pairs"]
    assert few["settings"]["max_scored"] == 2
    with pytest.raises(ValueError, match="max_scored"):
        evaluate_pairs(str(GPT2), str(out / "heldout.parquet"), max_scored=0, show_progress=False)


def test_reference_answers_are_written_by_the_base_and_read_by_every_adapter(hh_split, adapter, tmp_path):
    """``reference_answers``: the base model's own evaluation writes its answers; an adapter's
    evaluation reads them as its reference's (the same answers its disabled adapter gives) instead
    of generating them again; other settings do not match the file and generate afresh."""
    from trace_ray.evaluate_pairs import evaluate_pairs

    out, _ = hh_split
    cache = tmp_path / "answers.json"
    kw = dict(policy=str(HH_POLICY), limit=40, max_prompts=3, num_samples=2, max_new_tokens=6, max_length=96,
              batch_size=16, show_progress=False, reference_answers=str(cache))
    base = evaluate_pairs(str(GPT2), str(out / "heldout.parquet"), **kw)
    saved = json.loads(cache.read_text())
    assert saved["answers"]["greedy"] == [g["greedy"] for g in base["generations"]]
    fresh = evaluate_pairs(str(adapter), str(out / "heldout.parquet"), **dict(kw, reference_answers=None))
    cached = evaluate_pairs(str(adapter), str(out / "heldout.parquet"), **kw)
    assert cached["tpa"]["reference"] == fresh["tpa"]["reference"] == {k: base["tpa"][k] for k in ("greedy", "sampled")}
    # the file is what is read: a verdict changed in it shows in the adapter's reference numbers
    saved["answers"]["greedy_verdicts"] = ["compliant"] * len(saved["answers"]["greedy_verdicts"])
    cache.write_text(json.dumps(saved))
    assert evaluate_pairs(str(adapter), str(out / "heldout.parquet"), **kw)["tpa"]["reference"]["greedy"] == 1.0
    other = evaluate_pairs(str(adapter), str(out / "heldout.parquet"), **dict(kw, max_new_tokens=5))
    assert other["tpa"]["reference"]["greedy"] == pytest.approx(
        evaluate_pairs(str(GPT2), str(out / "heldout.parquet"), **dict(kw, max_new_tokens=5, reference_answers=None))["tpa"]["greedy"])


def test_lora_model_generates_through_a_merged_copy_with_the_same_answers(adapter):
    """``_for_generation``: the merged copy's answers are the LoRA model's own (fp32 greedy), and
    the model keeps its adapter, so its ``disable_adapter`` reference is still the base."""
    import torch

    from trace_ray.evaluate import generate
    from trace_ray.evaluate_pairs import _for_generation
    from trace_ray.models.load import load_model, load_tokenizer

    net, tok = load_model(str(adapter)).eval(), load_tokenizer(str(adapter))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    merged = _for_generation(net)
    assert not hasattr(merged, "disable_adapter") and merged is not net
    prompts = ["How do I bake bread?", "Tell me about the weather in spring, please.", "Hi"]
    kw = dict(do_sample=False, max_new_tokens=12, batch_size=3, by_length=True)
    assert generate(merged, tok, prompts, **kw) == generate(net, tok, prompts, **kw)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with net.disable_adapter():
        ref = generate(net, tok, prompts, **kw)
    assert ref != generate(net, tok, prompts, **kw)  # the random adapter does change the answers
    assert _for_generation(merged) is merged  # a plain model generates as it is


def test_report_of_a_real_run(hh_split, evaluated, tmp_path):
    """A short real training run on conflict rows of the HH training split, then `trace-ray report`:
    the numbers in report.json / report.html are those of the run's own files."""
    import pyarrow as pa

    from trace_ray.cli import main
    from trace_ray.train import train_local

    out, summary = hh_split
    rows = pq.read_table(out / "triaged.parquet").to_pylist()
    subset = [r for r in rows if r["category"] in ("invert", "punish")][:24] + [r for r in rows if r["category"] == "retain"][:4]
    triaged = tmp_path / "triaged.parquet"
    pq.write_table(pa.Table.from_pylist(subset), triaged)
    run = tmp_path / "run"
    train_local({"data": {"triaged": str(triaged), "max_length": 48}, "output": {"dir": str(run)},
                 "model": {"name": str(GPT2), "lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["c_attn"]}},
                 "impact": {"weights": "impact", "method": "fd", "gold_size": 6, "batch_size": 8},
                 "train": {"batch_size": 8, "max_steps": 2, "seed": 0}, "logging": {"progress": False}})
    assert main(["report", "--run", str(run), "--triage", str(out), "--metrics", f"trace={evaluated}",
                 "--out", str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    html = (tmp_path / "rep" / "report.html").read_text()
    w = pq.read_table(run / "weights.parquet").to_pydict()
    weights = dict(zip(w["id"], w["weight"]))
    cat = {r["id"]: r["category"] for r in subset}
    assert len(weights) == 24
    for c in ("invert", "punish"):
        ws = [x for i, x in weights.items() if cat[i] == c]
        got = rep["run"]["weights_by_category"][c]
        assert got["n"] == len(ws) and got["zero_share"] == sum(x == 0 for x in ws) / len(ws)
    ranked = sorted(weights, key=lambda i: (-weights[i], i))  # highest first
    top = ranked[:10]
    assert [s["id"] for s in rep["run"]["weighted_samples"]["top"]] == top
    assert [s["id"] for s in rep["run"]["weighted_samples"]["bottom"]] == ranked[::-1][:10]
    best = next(r for r in subset if r["id"] == top[0])
    import html as H

    assert H.escape(best["chosen"][:300]) in html
    for name, hits in summary["rule_hits"].items():
        assert f"<td>{name}</td><td>{hits['chosen']}</td><td>{hits['rejected']}</td>" in html
    curves = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert rep["methods"]["trace"]["runs"][0]["curves"] == curves and len(curves) == 2
    m = json.loads(evaluated.read_text())
    assert rep["methods"]["trace"]["mean"]["tpa_greedy"] == m["tpa_greedy"]
    assert f"<td>utility.nll_per_token</td><td>{m['utility']['nll_per_token']:.4g}</td>" in html
    for png in ("training.png", "weights_by_category.png", "losses.png", "triage.png"):
        assert png in html and (tmp_path / "rep" / png).read_bytes()[:4] == b"\x89PNG"


def _as_folder(rows, folder):
    """Rows as a Spark-style folder of part files with a _SUCCESS marker (Ray Data's writers)."""
    import pyarrow as pa

    from trace_ray.data.schema import TRIAGED

    folder.mkdir()
    half = len(rows) // 2
    for i, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part, schema=TRIAGED), folder / f"part-{i:05d}.parquet")
    (folder / "_SUCCESS").write_text("")
    return folder


def test_readers_of_triage_outputs_accept_a_folder_of_parts(hh_split, tmp_path):
    from trace_ray.config import from_dict
    from trace_ray.evaluate_pairs import evaluate_pairs
    from trace_ray.train.config import RunConfig
    from trace_ray.train.data import prepare_records
    from trace_ray.train.run import check_inputs, gold_records

    out, _ = hh_split
    train = pq.read_table(out / "triaged.parquet").to_pylist()[:60]
    folder = _as_folder(train, tmp_path / "triaged.parquet")
    cfg = from_dict(RunConfig, {"data": {"triaged": str(folder)}, "model": {"name": str(GPT2)},
                                "output": {"dir": str(tmp_path / "r")}})
    info = check_inputs(cfg)
    assert info["counts"] == {c: sum(r["category"] == c for r in train) for c in info["counts"]}
    used = [r["id"] for r in train if r["category"] in ("invert", "punish", "retain")]
    assert [r["id"] for r in prepare_records(cfg)] == used
    assert gold_records(cfg)
    held = pq.read_table(out / "heldout.parquet").to_pylist()[:20]
    hfolder = _as_folder(held, tmp_path / "heldout.parquet")
    m = evaluate_pairs(str(GPT2), str(hfolder), limit=20, max_length=64, batch_size=16, show_progress=False)
    assert m["split"] == "heldout" and m["counts"] == {c: sum(r["category"] == c for r in held) for c in m["counts"]}
    with pytest.raises(ValueError, match="is the training table"):
        evaluate_pairs(str(GPT2), str(folder))


def test_evaluate_runs_a_judge_policy_on_the_generations(hh_split, tiny_model_dir):
    """A judge rule is answered by its model in-process; the verdicts equal the judge called directly."""
    from trace_ray.evaluate_pairs import evaluate_pairs
    from trace_ray.policy import load_policy
    from trace_ray.policy.judge import HFJudge, parse_judge_answer

    pol = load_policy({"name": "j", "version": 1, "description": "No weapons.", "rules": [
        {"name": "llm", "kind": "judge", "model": str(tiny_model_dir), "max_new_tokens": 2, "batch_size": 4}]})
    m = evaluate_pairs(str(GPT2), str(hh_split[0] / "heldout.parquet"), policy=pol, limit=40, max_prompts=2,
                       num_samples=1, max_new_tokens=4, max_length=64, batch_size=8, show_progress=False)
    gens = [g for g in m["generations"] if g["category"] == "conflict"]
    answers = HFJudge(pol.judge_rule).judge([g["prompt"] for g in gens], [g["greedy"] for g in gens])
    want = [{"compliant": "compliant", "non_compliant": "non_compliant"}.get(parse_judge_answer(pol.judge_rule, a), "error")
            for a in answers]
    assert [g["verdict"] for g in gens] == want
    assert m["tpa"]["undecided_greedy"] == pytest.approx(sum(v == "error" for v in want) / len(want))
