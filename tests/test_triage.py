"""Stage 1 on Ray Data against counts derived independently from the raw files."""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import json
import re
from collections import Counter

import pyarrow.parquet as pq
import yaml

from conftest import ROOT
from test_readers import write_malformed
from trace_ray.cli import main
from trace_ray.data.readers import iter_records
from trace_ray.data.schema import TRIAGED
from trace_ray.policy import load_policy
from trace_ray.triage import run_triage, triage_records

PKU_POLICY = ROOT / "configs/policies/pku_harm_v2.yaml"
HH_POLICY = ROOT / "configs/policies/hh_harmless_v2.yaml"


def _category(c_bad, r_bad):
    if not c_bad:
        return "retain"
    return "punish" if r_bad else "invert"


def _sha_id(prompt, chosen, rejected):
    h = hashlib.sha256()
    for part in (prompt, chosen, rejected):
        h.update(part.encode() + b"\x1f")
    return h.hexdigest()[:16]


def pku_rows(path):
    """``(id, raw row, index of the chosen response)`` per PKU row, chosen = better_response_id."""
    for line in path.read_text().splitlines():
        row = json.loads(line)
        c = row["better_response_id"]
        yield _sha_id(row["prompt"], row[f"response_{c}"], row[f"response_{1 - c}"]), row, c


def pku_bad(row, i, sev_min, zero=frozenset()):
    """Response i breaks a PKU metadata policy: severity >= sev_min or a flagged category in ``zero``."""
    flagged = {k for k, v in row[f"response_{i}_harm_category"].items() if v}
    return row[f"response_{i}_severity_level"] >= sev_min or bool(flagged & set(zero))


def pku_policy_terms(path=PKU_POLICY):
    """(severity threshold, zero-tolerance categories) read from a PKU policy YAML."""
    spec = yaml.safe_load(path.read_text())
    sev_min = next(r["severity_at_least"] for r in spec["rules"] if "severity_at_least" in r)
    zero = set(next((r["harm_category"] for r in spec["rules"] if "harm_category" in r), []))
    return sev_min, zero


def expected_pku(path):
    """PKU rows, chosen = better_response_id, the policy's logic written out from its YAML."""
    sev_min, zero = pku_policy_terms()
    return {key: _category(pku_bad(row, c, sev_min, zero), pku_bad(row, 1 - c, sev_min, zero))
            for key, row, c in pku_rows(path)}


@functools.lru_cache(maxsize=1)
def hh_checks():
    """The HH policy's rules written out with stdlib re (keywords: whole words, any case)."""
    spec = yaml.safe_load(HH_POLICY.read_text())
    checks = []
    for r in spec["rules"]:
        if r["kind"] == "keywords":
            words = "|".join(re.escape(k) for k in r["keywords"])
            checks.append(re.compile(rf"(?<!\w)(?:{words})(?!\w)", re.IGNORECASE))
        else:
            flags = 0
            for f in r.get("flags", []):
                flags |= getattr(re, f)
            checks.extend(re.compile(p, flags) for p in r["patterns"])
    return checks


def hh_bad(text: str) -> bool:
    """Non-compliant under the HH policy (every rule reads the response)."""
    return any(p.search(text) for p in hh_checks())


def expected_hh(path):
    """HH transcripts cut at the last shared Assistant turn; keywords and regexes via stdlib re."""
    checks = hh_checks()
    cats = Counter()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            ends = [m.end() for m in re.finditer(r"\n\nAssistant:", row["chosen"])
                    if row["rejected"][: m.end()] == row["chosen"][: m.end()]]
            c, r = row["chosen"][ends[-1]:].strip(), row["rejected"][ends[-1]:].strip()
            if not c or not r:
                cats["unresolved"] += 1
                continue
            cats[_category(any(p.search(c) for p in checks), any(p.search(r) for p in checks))] += 1
    return cats


def _read_out(out):
    table = pq.read_table(out / "triaged.parquet")
    assert table.schema.equals(TRIAGED)
    return table.to_pylist(), json.loads((out / "summary.json").read_text())


def test_pku_metadata_policy(ray_session, pku_path, tmp_path):
    want = expected_pku(pku_path)
    summary = run_triage(pku_path, PKU_POLICY, tmp_path, show_progress=False)
    rows, saved = _read_out(tmp_path)
    assert saved == summary and summary["total"] == 50 == len(rows)
    assert summary["counts"] == {c: Counter(want.values())[c] for c in ("invert", "punish", "retain", "unresolved")}
    assert {r["id"]: r["category"] for r in rows} == want
    assert summary["counts"]["invert"] > 0 and summary["counts"]["punish"] > 0
    # per-rule hits: responses each rule flagged, counted from the output independently
    hits = Counter()
    for r in rows:
        for side in ("chosen", "rejected"):
            if r[f"{side}_verdict"] == "non_compliant":
                for reason in json.loads(r["reasons"])[side]:
                    hits[(reason.split(":")[0], side)] += 1
    assert {(k, s): v[s] for k, v in summary["rule_hits"].items() for s in v if v[s]} == dict(hits)
    assert all(len(summary["examples"][c]) == min(3, summary["counts"][c]) for c in summary["counts"])
    assert summary["policy"] == load_policy(PKU_POLICY).fingerprint == rows[0]["policy"]


def test_hh_text_policy(ray_session, hh_path, tmp_path):
    want = expected_hh(hh_path)
    summary = run_triage(hh_path, HH_POLICY, tmp_path, show_progress=False, batch_size=500)
    rows, _ = _read_out(tmp_path)
    assert summary["total"] == sum(want.values()) == len(rows) == 2312
    assert summary["counts"] == {c: want[c] for c in ("invert", "punish", "retain", "unresolved")}
    assert len({r["id"] for r in rows}) == len(rows)
    assert summary["unresolved_reasons"] == {"empty response": want["unresolved"]}
    # the same answers offline (plain python; what the HTTP server calls) as on Ray Data
    offline = triage_records(load_policy(HH_POLICY), list(iter_records(hh_path)))
    by_id = {r["id"]: r for r in rows}
    assert all(by_id[o["id"]] == o for o in offline)


def test_malformed_rows_are_unresolved_and_counts_add_up(ray_session, tmp_path):
    data = tmp_path / "bad.jsonl"
    reasons = write_malformed(data)
    summary = run_triage(data, HH_POLICY, tmp_path / "out", format="pairs", show_progress=False)
    rows, _ = _read_out(tmp_path / "out")
    assert summary["total"] == len(rows) == 6 and sum(summary["counts"].values()) == 6
    assert summary["counts"]["unresolved"] == len(reasons) == 4
    errs = sorted(json.loads(r["reasons"])["error"] for r in rows if r["category"] == "unresolved")
    for (line, why), err in zip(sorted(reasons.items()), errs):
        assert err.startswith(f"bad.jsonl:{line}: ") and why in err
    assert all(r["chosen_verdict"] == r["rejected_verdict"] == "error" for r in rows if r["category"] == "unresolved")


def test_triage_records_on_user_dicts():
    pol = load_policy(HH_POLICY)
    out = triage_records(pol, [
        {"prompt": "hi", "chosen": "Grab a knife.", "rejected": "I can't help with that."},
        {"prompt": "hi", "chosen": "Sure.", "rejected": "Buy a gun."},
        {"prompt": "hi", "chosen": "You idiot.", "rejected": "Stupid question."},
        {"prompt": "hi", "chosen": "ok"},
        {"prompt": "hi", "chosen": "ok", "rejected": 3},
    ])
    assert [o["category"] for o in out] == ["invert", "retain", "punish", "unresolved", "unresolved"]
    assert json.loads(out[0]["reasons"]) == {"chosen": ["weapons_drugs: keyword 'knife'"], "rejected": []}
    assert json.loads(out[3]["reasons"]) == {"error": "missing field 'rejected'"}
    assert json.loads(out[4]["reasons"]) == {"error": "field 'rejected' is not a string"}
    assert set(out[0]) == set(TRIAGED.names)


def test_meta_error_verdict_is_unresolved():
    """A meta rule on data without labels cannot decide: error verdicts, pair unresolved, reason kept."""
    pol = load_policy(PKU_POLICY)
    (out,) = triage_records(pol, [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    assert out["category"] == "unresolved" and out["chosen_verdict"] == "error"
    assert "response metadata has no 'severity'" in json.loads(out["reasons"])["chosen"][0]


def test_cli(ray_session, pku_path, tmp_path, capsys):
    rc = main(["triage", "--data", str(pku_path), "--policy", str(PKU_POLICY), "--out", str(tmp_path),
               "--format", "pku", "--pku-chosen", "safer", "--compression", "zstd", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert f"triage: 50 pairs  policy {saved['policy']}" in text and "rule hits" in text
    assert saved["pku_chosen"] == "safer" and sum(saved["counts"].values()) == 50
    assert saved["compression"] == "zstd"
    from trace_ray.cli import build_parser
    from trace_ray.triage_output import COMPRESSIONS

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    (codecs,) = [a.choices for a in sub.choices["triage"]._actions if a.dest == "compression"]
    assert tuple(codecs) == COMPRESSIONS  # --help offers exactly what the writer takes
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nversion: 1\nrules:\n  - {name: a, kind: regex, pattern: '(('}\n")
    assert main(["triage", "--data", str(pku_path), "--policy", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.yaml:4: rule 'a'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing started
