"""SynthShift: the world's exact labels agree with the policy oracle (YAML rules) and with triage;
splits are disjoint; the export round-trips through the canonical schema."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest

from trace_ray.data import synthshift as ss


@pytest.fixture(scope="module")
def world():
    return ss.build_world(ss.WorldConfig(seed=0))


def test_labels_agree_with_policy_oracle(world):
    from trace_ray.policy import load_policy

    policy = load_policy(ss.POLICY_PATH)
    for split, recs in world.pairs.items():
        prompts = [r["prompt"] for r in recs]
        for side in ("chosen", "rejected"):
            verdicts = policy.check(prompts, [r[side] for r in recs], [{} for _ in recs])
            expected = [json.loads(r["meta"])[f"expected_{side}_verdict"] for r in recs]
            assert [v.verdict for v in verdicts] == expected, (split, side)


def test_labels_follow_the_rule_written_out(world):
    # Independent route: the new policy from the module docstring, from the meta fields alone.
    for r in world.pairs["train"]:
        m = json.loads(r["meta"])
        for side in ("chosen", "rejected"):
            detailed = m[f"{side}_style"] in ("detailed", "detailed_alt")
            want = "non_compliant" if (m["shifted"] and detailed) else "compliant"
            assert m[f"expected_{side}_verdict"] == want


def test_all_three_outcomes_in_realistic_proportions(world):
    counts = world.stats()["train"]["expected"]
    n = sum(counts.values())
    assert set(counts) == {"invert", "punish", "retain"}
    assert 0.12 < counts["invert"] / n < 0.40
    assert 0.10 < counts["punish"] / n < 0.25  # false-dichotomy pairs: a sizeable share, both answers break the policy
    assert counts["retain"] / n > 0.4
    # every punish pair is detailed vs detailed on a shifted topic
    for r in world.pairs["train"]:
        m = json.loads(r["meta"])
        if m["expected_category"] == "punish":
            assert m["shifted"] and {m["chosen_style"], m["rejected_style"]} <= set(ss.DETAILED_STYLES)


def test_old_policy_prefers_detail(world):
    for r in world.pairs["train"]:
        m = json.loads(r["meta"])
        assert ss.STYLES.index(m["chosen_style"]) < ss.STYLES.index(m["rejected_style"])


def test_splits_are_disjoint_and_test_is_unseen(world):
    tasks = {s: {p.task for p in world.prompts[s]} for s in world.prompts}
    assert not tasks["train"] & tasks["val"] and not tasks["train"] & tasks["test"] and not tasks["val"] & tasks["test"]
    # held-out phrasings: no test prompt matches a training template
    train_shapes = [re.escape(t).replace(r"\{topic\}", ".+").replace(r"\{Topic\}", ".+").replace(r"\{task\}", ".+")
                    for t in ss.TRAIN_TEMPLATES]
    for p in world.prompts["test"]:
        assert not any(re.fullmatch(s, p.prompt) for s in train_shapes), p.prompt
    # every topic (shifted or not) appears in every split
    for s in world.prompts:
        assert {p.topic for p in world.prompts[s]} == set(ss.TOPICS)


def test_train_phrasings_and_pretraining_prompts(world):
    cfg = world.config
    by_task = {}
    for p in world.prompts["train"]:
        by_task.setdefault((p.topic, p.task), set()).add(p.template)
    # each train task in k of the 12 train phrasings, every phrasing used
    assert {len(v) for v in by_task.values()} == {cfg.train_templates_per_task}
    assert set().union(*by_task.values()) == set(range(len(ss.TRAIN_TEMPLATES)))
    # the reference's first stage knows every object and phrasing but never an exact held-out prompt
    pre = {p.prompt for p in ss.pretraining_prompts(world)}
    held_out = {p.prompt for s in ("val", "test") for p in world.prompts[s]}
    assert not pre & held_out
    assert {p.prompt for p in world.prompts["train"]} <= pre
    words = " ".join(pre)
    for p in world.prompts["test"]:
        assert p.task in words
    texts = ss.sft_texts(world, "styles")
    assert not {q for q, _ in texts} & held_out
    assert {q for q, _ in ss.sft_texts(world, "old")} <= {p.prompt for p in world.prompts["train"]}


def test_deterministic_and_seeded():
    a = ss.build_world(ss.WorldConfig(seed=3)).pairs["train"]
    b = ss.build_world(ss.WorldConfig(seed=3)).pairs["train"]
    c = ss.build_world(ss.WorldConfig(seed=4)).pairs["train"]
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert [r["id"] for r in a] != [r["id"] for r in c]


def test_style_classifier_and_reference_mixes_depend_on_topic(world):
    p = world.prompts["test"][0]
    for s, text in p.responses().items():
        assert ss.style_of(text) == s
    assert ss.style_of("garbled words") == "other"
    mixes = ss.topic_mixes(0)
    hedging = {t: m["old"][2] for t, m in mixes.items()}
    assert max(hedging.values()) - min(hedging.values()) > 0.05


def test_export_roundtrip(tmp_path, world):
    from trace_ray.data.readers import iter_records

    recs = world.pairs["val"]
    for suffix in ("jsonl", "parquet"):
        path = ss.export_pairs(recs, tmp_path / f"val.{suffix}")
        back = list(iter_records(str(path), "pairs"))
        assert [r["id"] for r in back] == [r["id"] for r in recs]
        assert all("_error" not in r or not r["_error"] for r in back)
    t = pq.read_table(tmp_path / "val.parquet")
    assert t.column_names == ["id", "prompt", "chosen", "rejected", "meta"]
    with pytest.raises(ValueError, match="suffix"):
        ss.export_pairs(recs, tmp_path / "val.csv")


def test_triage_on_ray_matches_world_labels(tmp_path, world, ray_session):
    from trace_ray.triage import run_triage

    paths = ss.write_world(world, tmp_path / "world")
    summary = run_triage(paths["val"], ss.POLICY_PATH, tmp_path / "triage", show_progress=False)
    rows = pq.read_table(tmp_path / "triage" / "triaged.parquet").to_pylist()
    assert len(rows) == len(world.pairs["val"])
    for r in rows:
        assert r["category"] == json.loads(r["meta"])["expected_category"]
    expected = world.stats()["val"]["expected"]
    for cat in ("invert", "punish", "retain"):
        assert summary["counts"][cat] == expected[cat]
    assert summary["counts"]["unresolved"] == 0


def test_synthshift_configs_load():
    from pathlib import Path

    from trace_ray.policy import load_policy
    from trace_ray.train.config import load_run_config

    folder = Path(ss.POLICY_PATH).parent
    load_policy(folder / "policy.yaml")
    methods = {}
    for f in sorted(folder.glob("*.yaml")):
        text = f.read_text()
        assert text.startswith("# Run"), f"{f.name}: the header must give the command"
        if f.name == "policy.yaml":
            continue
        cfg = load_run_config(f)
        methods[f.stem] = cfg
    assert set(methods) == {"trace", "trace_uniform", "naive_dpo", "npo_all"}
    # fairness: everything but method / weights / output dir is identical across methods
    from trace_ray.config import to_dict

    def strip(c):
        d = to_dict(c)
        d.pop("method")
        d["impact"].pop("weights")
        d["output"].pop("dir")
        return d

    base = strip(methods["trace"])
    for name, c in methods.items():
        assert strip(c) == base, name
    assert methods["trace"].impact.weights == "impact" and methods["trace_uniform"].impact.weights == "uniform"
