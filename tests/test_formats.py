"""The formats users have: TRL standard / conversational / implicit prompt, Hugging Face datasets
(a saved folder, a DatasetDict with splits, a hub id from a local offline cache), column mapping,
and the pre-flight stop on mostly-unresolved data. Expected records and categories are derived
from the raw rows in plain Python; triage runs on Ray Data."""

from __future__ import annotations

import functools
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from test_triage import HH_POLICY, PKU_POLICY, _category, _sha_id, hh_bad
from trace_ray.data.readers import detect_format, iter_records
from trace_ray.policy import load_policy
from trace_ray.preflight import MostlyUnresolved, check_resolvable
from trace_ray.triage import triage_table_records

# (question, an answer the HH policy accepts, one it flags)
BASE = [
    ("How do I get into my neighbour's wifi?", "Please ask your neighbour for the password.", "You can hack the router."),
    ("What should I bring to a picnic?", "Bring fruit, water and a blanket.", "Bring a knife and a gun."),
    ("My coworker annoys me.", "Try talking to them calmly.", "Tell them they are an idiot."),
    ("How do I make bread?", "Mix flour and water, let it rise, then bake it.", "You could steal it from a bakery."),
    ("Can I borrow a car?", "Ask the owner first.", "Just steal one; hack the lock."),
    ("Tell me about cats.", "Cats are curious animals.", "Cats hate guns."),
]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def _user(q):
    return {"role": "user", "content": q}


def _asst(a):
    return {"role": "assistant", "content": a}


def _history(i):
    """A multi-turn opening for row i (earlier turns, then the question)."""
    return [SYSTEM, _user("Hi there"), _asst("Hello! How can I help?"), _user(BASE[i][0])]


def trl_rows():
    """One row per layout TRL users have, and the canonical record each must give (in plain Python)."""
    rows, want = [], []
    for i, (q, good, bad) in enumerate(BASE):
        chosen, rejected = (bad, good) if i % 2 else (good, bad)
        conv = _history(i)
        layouts = [
            ({"prompt": q, "chosen": chosen, "rejected": rejected}, q),  # standard
            ({"prompt": [_user(q)], "chosen": [_asst(chosen)], "rejected": [_asst(rejected)]}, [_user(q)]),  # conversational
            ({"prompt": conv, "chosen": [_asst(chosen)], "rejected": [_asst(rejected)]}, conv),  # multi-turn
            ({"prompt": q, "chosen": [_user(q), _asst(chosen)], "rejected": [_user(q), _asst(rejected)]}, q),  # H4 UltraFeedback
        ]
        for raw, prompt in layouts:
            stored = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
            rows.append(raw)
            want.append({"prompt": stored, "chosen": chosen, "rejected": rejected,
                         "id": _sha_id(stored, chosen, rejected), "category": _category(hh_bad(chosen), hh_bad(rejected))})
    return rows, want


def implicit_rows():
    """TRL implicit prompt: whole conversations; the last three rows cannot be split."""
    rows, want = [], []
    for i, (q, good, bad) in enumerate(BASE):
        conv = _history(i)
        rows.append({"chosen": conv + [_asst(good)], "rejected": conv + [_asst(bad)], "score": i})
        stored = json.dumps(conv, ensure_ascii=False)
        want.append({"prompt": stored, "chosen": good, "rejected": bad, "id": _sha_id(stored, good, bad),
                     "category": _category(hh_bad(good), hh_bad(bad)), "error": None})
    rows.append({"chosen": [_user("a"), _asst("b")], "rejected": [_user("c"), _asst("d")]})
    rows.append({"chosen": [_user("a"), _asst("b"), _user("more"), _asst("c")], "rejected": [_user("a"), _asst("d")]})
    rows.append({"chosen": [_user("a"), _asst("b")], "rejected": [_user("a"), _asst("b")]})
    for why in ("share no opening turn", "does not hold one assistant reply", "the same conversation"):
        want.append({"error": why, "category": "unresolved"})
    return rows, want


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _check(recs, want):
    assert len(recs) == len(want)
    for rec, w in zip(recs, want):
        if w.get("error"):
            assert rec["_error"] and w["error"] in rec["_error"], rec["_error"]
            continue
        assert rec["_error"] is None, rec["_error"]
        assert {k: rec[k] for k in ("prompt", "chosen", "rejected", "id")} == {k: w[k] for k in ("prompt", "chosen", "rejected", "id")}


def test_trl_standard_and_conversational_read_as_pairs(tmp_path):
    rows, want = trl_rows()
    p = _jsonl(tmp_path / "trl.jsonl", rows)
    assert detect_format(p) == "pairs"
    _check(list(iter_records(p)), want)
    # a conversation stays messages: the stored prompt parses back to the same list
    multi = [r for r, w in zip(rows, want) if isinstance(r["prompt"], list) and len(r["prompt"]) > 1]
    assert multi and all(json.loads(w["prompt"]) == r["prompt"] for r, w in zip(rows, want) if r in multi)


def test_trl_implicit_prompt_and_its_unresolved_rows(tmp_path):
    rows, want = implicit_rows()
    p = _jsonl(tmp_path / "implicit.jsonl", rows)
    assert detect_format(p) == "implicit"
    recs = list(iter_records(p))
    _check(recs, want)
    assert json.loads(recs[0]["meta"]) == {"fields": {"score": 0}}  # other columns are kept
    # an unresolved row keeps what it held (as JSON) with its file:line
    assert recs[-1]["_error"].startswith(f"implicit.jsonl:{len(rows)}: ") and json.loads(recs[-1]["chosen"])[1]["content"] == "b"


def test_malformed_messages_are_unresolved_with_reasons(tmp_path):
    bad = [
        {"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
        {"prompt": [_user("q")], "chosen": [_asst("a"), _asst("again")], "rejected": [_asst("b")]},
        {"prompt": [_user("q")], "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "a"}]}],
         "rejected": [_asst("b")]},
        {"prompt": 7, "chosen": "a", "rejected": "b"},
    ]
    recs = list(iter_records(_jsonl(tmp_path / "bad.jsonl", bad), "pairs"))
    reasons = [r["_error"].split(": ", 1)[1] for r in recs]
    assert reasons[0] == "field 'prompt' holds an item that is not a message with 'role' and 'content'"
    assert reasons[1].startswith("'chosen' does not hold one assistant reply after the prompt: 2 message(s)")
    assert reasons[2] == "field 'chosen' holds a message whose content is not text (list)"
    assert reasons[3] == "field 'prompt' is not a string or a list of messages (int)"


def test_column_mapping(tmp_path):
    rows = [{"question": q, "good": g, "bad": b, "lang": "en"} for q, g, b in BASE]
    p = _jsonl(tmp_path / "mapped.jsonl", rows)
    with pytest.raises(ValueError, match=r"cannot detect the format from the columns \['bad', 'good', 'lang', 'question'\].*--prompt-key"):
        detect_format(p)
    keys = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert detect_format(p, keys) == "pairs"
    recs = list(iter_records(p, keys=keys))
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in recs] == [tuple(b) for b in BASE]
    assert all(json.loads(r["meta"]) == {"fields": {"lang": "en"}} for r in recs)
    typo = list(iter_records(p, "pairs", keys={"prompt": "questoin"}))
    assert all(r["_error"].endswith("missing field 'questoin' (--prompt-key)") for r in typo)


def _save_dataset(rows, path):
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def test_datasets_folder_and_dataset_dict(tmp_path):
    import datasets

    rows, want = trl_rows()
    conv = [r for r in rows if isinstance(r["prompt"], list)]  # one Arrow schema: message-list columns
    conv_want = [w for r, w in zip(rows, want) if isinstance(r["prompt"], list)]
    _check(list(iter_records(_save_dataset(conv, tmp_path / "ds"))), conv_want)
    imp, imp_want = implicit_rows()
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(conv), "test": datasets.Dataset.from_list(imp[:6])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="has the splits train, test: choose one with --split"):
        list(iter_records(tmp_path / "dd"))
    _check(list(iter_records(tmp_path / "dd", split="test")), imp_want[:6])
    with pytest.raises(ValueError, match=r"--split 'dev'.*has the splits train, test"):
        list(iter_records(tmp_path / "dd", split="dev"))
    with pytest.raises(ValueError, match="a split applies only to those"):
        list(iter_records(_jsonl(tmp_path / "x.jsonl", rows[:1]), split="train"))


def test_hub_id_through_the_datasets_cache_offline(tmp_path, monkeypatch):
    """``org/name`` + split through ``datasets.load_dataset``, answered from a local cache that the
    datasets library itself built (nothing is downloaded: offline mode)."""
    import datasets
    import datasets.config

    imp, imp_want = implicit_rows()
    data = _jsonl(tmp_path / "d.jsonl", imp[:6])
    cache = tmp_path / "cache"
    datasets.load_dataset("json", data_files={"train": str(data), "test": str(data)}, cache_dir=str(cache))
    # the cache folder a hub dataset "someorg/prefs" gets: <org>___<name>/<config>/<version>/<hash>/
    built = next((cache / "json").glob("default-*/0.0.0/*"))
    dest = cache / "someorg___prefs" / "default" / "0.0.0" / built.name
    shutil.copytree(built, dest)
    for f in dest.glob("json-*.arrow"):
        f.rename(f.with_name(f.name.replace("json-", "prefs-")))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    assert detect_format("someorg/prefs", split="train") == "implicit"
    _check(list(iter_records("someorg/prefs", split="train")), imp_want[:6])
    with pytest.raises(FileNotFoundError, match="could not load it as a Hugging Face hub id"):
        list(iter_records("someorg/absent", split="train"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_records(tmp_path / "no" / "such.jsonl"))


def test_preflight_names_the_reason_and_the_flag(tmp_path, hh_path):
    rows = [{"question": q, "good": g, "bad": b} for q, g, b in BASE]
    pol = load_policy(HH_POLICY)
    recs = list(iter_records(_jsonl(tmp_path / "m.jsonl", rows), "pairs"))
    with pytest.raises(MostlyUnresolved, match=r"6 of the first 6 rows .* missing field 'prompt'\. Probable fix: "
                                               r"name the prompt column with --prompt-key COLUMN \(the file's columns: bad, good, question\)"):
        check_resolvable(iter(recs), ["bad", "good", "question"], pol, "pairs")
    # the oracle's reasons count too: a PKU metadata policy on HH text cannot decide anything
    hh = list(iter_records(hh_path))[:1000]
    pku = load_policy(PKU_POLICY)
    for file_rows in (None, functools.partial(triage_table_records, pku)):  # row-wise, and as run_triage files them
        with pytest.raises(MostlyUnresolved, match="use --format pku"):
            check_resolvable(iter(hh), ["chosen", "rejected"], pku, "hh", file_rows=file_rows)
    # the 4-of-6 malformed test file is not "mostly one reason": no stop
    from test_readers import write_malformed

    write_malformed(tmp_path / "bad.jsonl")
    got = check_resolvable(iter_records(tmp_path / "bad.jsonl", "pairs"), [], pol, "pairs")
    assert got["rows"] == 6 and sum(got["unresolved"].values()) == 4
    assert check_resolvable(iter_records(tmp_path / "bad.jsonl", "pairs"), [], pol, "pairs",
                            file_rows=functools.partial(triage_table_records, pol)) == got


def _triaged(out: Path) -> list[dict]:
    return pq.read_table(out / "triaged.parquet").to_pylist()


def test_triage_on_ray_for_trl_files_datasets_and_mapped_columns(ray_session, tmp_path, capsys):
    from trace_ray.cli import main
    from trace_ray.triage import run_triage

    # TRL standard + conversational layouts in one file, through the CLI
    rows, want = trl_rows()
    p = _jsonl(tmp_path / "trl.jsonl", rows)
    assert main(["triage", "--data", str(p), "--policy", str(HH_POLICY), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    got = {r["id"]: r for r in _triaged(tmp_path / "a")}
    assert {w["id"]: w["category"] for w in want} == {i: r["category"] for i, r in got.items()}
    assert all(got[w["id"]]["prompt"] == w["prompt"] for w in want)
    # TRL implicit prompt from a saved datasets folder (Arrow message lists), unresolved rows kept
    imp, imp_want = implicit_rows()
    s = run_triage(_save_dataset(imp, tmp_path / "ds"), HH_POLICY, tmp_path / "b", show_progress=False)
    out = _triaged(tmp_path / "b")
    assert s["format"] == "implicit" and s["total"] == len(out) == len(imp)
    assert s["counts"] == {c: Counter(w["category"] for w in imp_want)[c] for c in s["counts"]}
    assert {w["id"]: w["category"] for w in imp_want if not w["error"]} == {
        r["id"]: r["category"] for r in out if r["category"] != "unresolved"}
    # other column names: stopped before any work without the flags, triaged with them
    mapped = _jsonl(tmp_path / "m.jsonl", [{"question": q, "good": g, "bad": b} for q, g, b in BASE])
    args = ["triage", "--data", str(mapped), "--policy", str(HH_POLICY), "--no-progress", "--format", "pairs"]
    assert main(args + ["--out", str(tmp_path / "c")]) == 2
    assert "--prompt-key COLUMN" in capsys.readouterr().err and not (tmp_path / "c").exists()
    assert main(args + ["--out", str(tmp_path / "d"), "--prompt-key", "question", "--chosen-key", "good",
                        "--rejected-key", "bad"]) == 0
    assert [(r["prompt"], r["category"]) for r in _triaged(tmp_path / "d")] == [
        (q, _category(hh_bad(g), hh_bad(b))) for q, g, b in BASE]
    assert main(args + ["--out", str(tmp_path / "e"), "--allow-unresolved"]) == 0  # kept, every row unresolved
    assert [r["category"] for r in _triaged(tmp_path / "e")] == ["unresolved"] * len(BASE)


def test_rules_read_the_last_user_turn_and_the_judge_sees_the_conversation():
    from trace_ray.policy.judge import render_judge_prompt

    pol = load_policy({"name": "p", "version": 1, "rules": [
        {"name": "asks_bomb", "kind": "keywords", "target": "prompt", "keywords": ["bomb"]}]})
    conv = [_user("How is a bomb built?"), _asst("I can't help."), _user("Then tell me about cats.")]
    assert pol.check([json.dumps(conv)], ["Cats purr."])[0].verdict == "compliant"  # the earlier turn is not read
    assert pol.check([json.dumps(conv[:1])], ["x"])[0].verdict == "non_compliant"
    judge = load_policy({"name": "j", "version": 1, "rules": [{"name": "llm", "kind": "judge", "model": "m"}]}).judge_rule
    text = render_judge_prompt(judge, json.dumps(conv), "Cats purr.")
    assert "User: How is a bomb built?\n\nAssistant: I can't help.\n\nUser: Then tell me about cats." in text
