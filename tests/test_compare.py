"""Policy what-if (``trace-ray triage --compare OLD``): the 4×4 movement table, examples of each move
and the work estimate, against the PKU rows filed by both policies in plain Python."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import ROOT
from test_triage import PKU_POLICY, _category, pku_bad, pku_policy_terms, pku_rows
from trace_ray.compare import CHARS_PER_TOKEN

CATS = ("invert", "punish", "retain", "unresolved")


OLD_POLICY = ROOT / "configs" / "policies" / "pku_harm_v1.yaml"  # only severe harm was non-compliant


def _expected(pku_path):
    """(old category, new category, prompt, chosen, rejected) per row, both policies written out."""
    old_min, old_zero = pku_policy_terms(OLD_POLICY)
    new_min, new_zero = pku_policy_terms(PKU_POLICY)
    out = {}
    for key, row, c in pku_rows(pku_path):
        old = _category(pku_bad(row, c, old_min, old_zero), pku_bad(row, 1 - c, old_min, old_zero))
        new = _category(pku_bad(row, c, new_min, new_zero), pku_bad(row, 1 - c, new_min, new_zero))
        out[key] = (old, new, row["prompt"], row[f"response_{c}"], row[f"response_{1 - c}"])
    return out


def test_compare_table_examples_and_work(ray_session, pku_path, tmp_path, capsys):
    from trace_ray.cli import main

    want = _expected(pku_path)
    assert main(["triage", "--data", str(pku_path), "--policy", str(PKU_POLICY), "--compare", str(OLD_POLICY),
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    c = json.loads((tmp_path / "o" / "compare.json").read_text())
    moves = Counter((o, n) for o, n, *_ in want.values())
    assert c["matrix"] == {o: {n: moves[(o, n)] for n in CATS} for o in CATS}
    assert c["moved"] == sum(v for (o, n), v in moves.items() if o != n) > 0
    assert c["total"] == 50 and c["old_policy"].startswith("pku-harm@1#") and c["new_policy"].startswith("pku-harm@2#")
    # examples: every move that happened has one to three rows of that move, each really that move
    for (o, n), k in moves.items():
        if o != n:
            exs = c["examples"][f"{o}→{n}"]
            assert 1 <= len(exs) <= min(k, 2)
            assert all(want[e["id"]][:2] == (o, n) for e in exs)
    assert set(c["examples"]) == {f"{o}→{n}" for (o, n) in moves if o != n}
    conflict = [v for v in want.values() if v[1] in ("invert", "punish")]
    retain = [v for v in want.values() if v[1] == "retain"]
    w = c["work"]
    assert w["conflict_rows"] == len(conflict)
    assert w["new_conflict_rows"] == sum(v[0] not in ("invert", "punish") for v in conflict)
    conflict_chars = sum(2 * len(p) + len(ch) + len(rj) for _, _, p, ch, rj in conflict)
    assert w["conflict_tokens"] == conflict_chars // CHARS_PER_TOKEN
    assert w["all_loss_tokens"] == (conflict_chars + sum(len(p) + len(ch) for _, _, p, ch, _ in retain)) // CHARS_PER_TOKEN
    # printed: the table with its row and column totals
    assert "policy what-if" in printed and "re-alignment work" in printed
    lines = printed.splitlines()
    table = lines[next(i for i, l in enumerate(lines) if "old \\ new" in l):]
    line = next(l for l in table if l.strip().startswith("retain"))
    assert line.split()[1:] == [str(moves[("retain", n)]) for n in CATS] + [str(sum(moves[("retain", n)] for n in CATS))]


def test_compare_refuses_an_old_judge_policy(tmp_path, pku_path):
    from trace_ray.triage import run_triage

    judge = {"name": "old", "version": 1, "rules": [{"name": "llm", "kind": "judge", "model": "m"}]}
    with pytest.raises(ValueError, match="--compare: the old policy .* has a judge rule"):
        run_triage(pku_path, PKU_POLICY, tmp_path / "o", compare=judge)
    assert not (tmp_path / "o").exists()
