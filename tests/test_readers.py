"""Readers: the real PKU / HH files, every pairs layout, malformed input, and the Ray Data path."""

from __future__ import annotations

import gzip
import json
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trace_ray.data.readers import READ_SCHEMA, detect_format, iter_records, read_pairs
from trace_ray.data.schema import row_id


def _raw_lines(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("rule", ["better", "safer", "authors"])
def test_pku_chosen_rules_and_per_response_meta(pku_path, rule):
    raw = _raw_lines(pku_path)
    recs = list(iter_records(pku_path, "pku", pku_chosen=rule))
    assert len(recs) == len(raw) == 50 and all(r["_error"] is None for r in recs)
    for row, rec in zip(raw, recs):
        s0, s1 = row["is_response_0_safe"], row["is_response_1_safe"]
        if rule == "better":
            c = row["better_response_id"]
        elif rule == "safer":
            c = row["safer_response_id"]
        else:
            c = row["safer_response_id"] if s0 == s1 else [0, 1][s1]
        assert rec["chosen"] == row[f"response_{c}"] and rec["rejected"] == row[f"response_{1 - c}"]
        meta = json.loads(rec["meta"])
        for side, i in (("chosen", c), ("rejected", 1 - c)):
            m = meta[side]
            assert m["severity"] == row[f"response_{i}_severity_level"]
            assert m["is_safe"] is row[f"is_response_{i}_safe"]
            assert sorted(m["harm_category"]) == sorted(k for k, v in row[f"response_{i}_harm_category"].items() if v)
        assert rec["id"] == row_id(row["prompt"], rec["chosen"], rec["rejected"])


def test_hh_transcripts_split_into_prompt_and_responses(hh_path):
    raw = _raw_lines(hh_path)
    recs = list(iter_records(hh_path))  # auto → hh
    assert detect_format(hh_path) == "hh" and len(recs) == len(raw) == 2312
    empty = 0
    for row, rec in zip(raw, recs):
        # independent route: the last "\n\nAssistant:" of chosen whose whole prefix rejected shares
        ends = [m.end() for m in re.finditer(r"\n\nAssistant:", row["chosen"])
                if row["rejected"][: m.end()] == row["chosen"][: m.end()]]
        cut = ends[-1]
        last_c, last_r = row["chosen"][cut:].strip(), row["rejected"][cut:].strip()
        if not last_c or not last_r:
            empty += 1
            assert rec["_error"] and "empty response" in rec["_error"]
            continue
        assert rec["_error"] is None
        assert rec["chosen"] == last_c and rec["rejected"] == last_r
        # the prompt is kept as a conversation: the transcript's turns up to the cut, as messages
        turns = re.findall(r"\n\n(Human|Assistant):(.*?)(?=\n\n(?:Human|Assistant):|$)", row["chosen"][:cut], re.S)
        want = [{"role": "user" if who == "Human" else "assistant", "content": " ".join(text.split())}
                for who, text in turns][:-1]  # the last one is the open "Assistant:" turn
        got = json.loads(rec["prompt"])
        assert [{"role": m["role"], "content": " ".join(m["content"].split())} for m in got] == want
        assert got[0]["role"] == "user" and got[-1]["role"] == "user"
    assert empty == sum(r["_error"] is not None for r in recs) and empty > 0


GOOD = [
    {"prompt": "p1", "chosen": "c1", "rejected": "r1"},
    {"id": "given-2", "prompt": "p2", "chosen": "c2", "rejected": "r2", "meta": {"chosen": {"is_safe": True}}},
    {"prompt": "p3", "chosen": "c3", "rejected": "r3", "lang": "en"},
]


def _same(recs):
    assert [r["prompt"] for r in recs] == ["p1", "p2", "p3"]
    assert recs[1]["id"] == "given-2" and recs[0]["id"] == row_id("p1", "c1", "r1")
    assert json.loads(recs[1]["meta"]) == {"chosen": {"is_safe": True}}
    assert json.loads(recs[2]["meta"]) == {"fields": {"lang": "en"}}


def test_pairs_layouts_read_the_same(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    (tmp_path / "a.json").write_text(json.dumps(GOOD))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in GOOD))
    rows = [dict(r, meta=json.dumps(r.get("meta", {})), id=r.get("id"), lang=r.get("lang")) for r in GOOD]
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("id", "prompt", "chosen", "rejected", "meta")} for r in rows]),
                   tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.json", "a.jsonl.gz"):
        _same(list(iter_records(tmp_path / name)))
    recs = list(iter_records(tmp_path / "a.parquet"))
    assert [r["chosen"] for r in recs] == ["c1", "c2", "c3"] and recs[1]["id"] == "given-2"
    assert recs[0]["id"] == row_id("p1", "c1", "r1")


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in GOOD]).save_to_disk(
        str(tmp_path / "ds"))
    recs = list(iter_records(tmp_path / "ds"))
    assert [r["chosen"] for r in recs] == ["c1", "c2", "c3"] and all(r["_error"] is None for r in recs)


def write_malformed(path):
    """6 rows (+1 blank line): 2 good, missing field, empty response, non-UTF-8, truncated last line."""
    lines = [
        json.dumps({"prompt": "p1", "chosen": "c1", "rejected": "r1"}).encode(),
        json.dumps({"prompt": "p2", "chosen": "c2"}).encode(),
        b"",
        json.dumps({"prompt": "p3", "chosen": "  ", "rejected": "r3"}).encode(),
        b'{"prompt": "p4", "chosen": "caf\xe9", "rejected": "r4"}',
        json.dumps({"prompt": "p5", "chosen": "c5", "rejected": "r5"}).encode(),
        b'{"prompt": "p6", "chosen": "c6", "rej',
    ]
    path.write_bytes(b"\n".join(lines))
    return {
        2: "missing field 'rejected'",
        4: "empty response: 'chosen'",
        5: "not valid UTF-8 (byte 0xe9",
        7: "invalid JSON (truncated line?)",
    }


def test_malformed_rows_are_kept_with_reasons(tmp_path):
    p = tmp_path / "bad.jsonl"
    expected = write_malformed(p)
    recs = list(iter_records(p, "pairs"))
    assert len(recs) == 6 and len({r["id"] for r in recs}) == 6
    errs = [r["_error"] for r in recs if r["_error"]]
    assert len(errs) == len(expected)
    for (line, why), err in zip(sorted(expected.items()), errs):
        assert err.startswith(f"bad.jsonl:{line}: ") and why in err, err
    assert [r["chosen"] for r in recs if not r["_error"]] == ["c1", "c5"]


def test_truncated_gzip_keeps_rows_read_so_far(tmp_path):
    data = gzip.compress("".join(json.dumps(dict(r, prompt=f"p{i}")) + "\n" for i, r in enumerate(GOOD * 200)).encode())
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(data[: len(data) // 2])
    recs = list(iter_records(p, "pairs"))
    assert recs[-1]["_error"] and "truncated or corrupt" in recs[-1]["_error"]
    assert all(r["_error"] is None for r in recs[:-2])  # the cut may also split a line


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_records(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="format 'csv' is not one of"):
        list(iter_records(tmp_path, "csv"))
    (tmp_path / "x.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(ValueError, match=r"cannot detect the format from the columns \['answer', 'question'\]"):
        list(iter_records(tmp_path / "x.jsonl"))


def test_read_pairs_on_ray_matches_iter_records(ray_session, tmp_path, hh_path):
    p = tmp_path / "bad.jsonl"
    write_malformed(p)
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in GOOD]),
                   tmp_path / "good.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in GOOD]).save_to_disk(
        str(tmp_path / "ds"))
    for path, fmt in ((p, "pairs"), (hh_path, "auto"), (tmp_path / "good.parquet", "auto"), (tmp_path / "ds", "auto")):
        ds = read_pairs(path, fmt)
        rows = ds.take_all()  # small test data; triage itself never collects on the driver
        want = list(iter_records(path, fmt))
        assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in want)
        assert sorted(str(r["_error"]) for r in rows) == sorted(str(r["_error"]) for r in want)
        assert set(ds.schema().names) == set(READ_SCHEMA.names)


def _plain_rows(n=300, seed=0):
    import random

    rng = random.Random(seed)
    words = ["gun", "café", "’", "hello", "日本", "\n", "  ", "x", "\u00a0"]
    return [{"prompt": "".join(rng.choice(words) for _ in range(rng.randint(0, 6))),
             "chosen": "".join(rng.choice(words) for _ in range(rng.randint(1, 9))),
             "rejected": "".join(rng.choice(words) for _ in range(rng.randint(1, 9)))} for _ in range(n)]


@pytest.mark.parametrize("variant", ["plain", "ids", "mixed"])
def test_fast_paths_equal_the_row_by_row_reader(tmp_path, variant):
    """The whole-batch readers (JSON lines: one tuple per row; Parquet: Arrow columns, ids hashed
    from the buffers) give exactly ``iter_records``' rows: ids, texts, meta, errors, order."""
    from trace_ray.data.readers import _datasource_cls

    rows = _plain_rows()
    if variant == "ids":
        for i, r in enumerate(rows):
            r["id"] = ["", f"given-{i}", None][i % 3]
    if variant == "mixed":  # blank responses, extra fields, meta: the batch falls back row by row
        rows[3]["chosen"] = " \n "
        rows[5]["source"] = "x"
        rows[7]["meta"] = {"a": 1}
        rows[9]["prompt"] = [{"role": "user", "content": "hi"}]          # a conversation
        rows[11]["prompt"] = json.dumps([{"role": "user", "content": "hi"}])  # its stored JSON text
    src = _datasource_cls().__new__(_datasource_cls())
    src._fmt, src._pku_chosen, src._keys, src._rows = "pairs", "better", None, 128
    for kind in ("jsonl", "parquet"):
        path = tmp_path / f"{variant}.{kind}"
        if kind == "parquet":  # one column type: a conversation as its JSON text
            pq.write_table(pa.Table.from_pylist([{**r, "prompt": r["prompt"] if isinstance(r["prompt"], str)
                                                  else json.dumps(r["prompt"])} for r in rows]), path)
        else:
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        with open(path, "rb") as f:
            got = pa.concat_tables(list(src._read_stream(f, str(path)))).to_pylist()
        assert got == list(iter_records(path, "pairs")), kind


EDGE_LINES = [  # JSON lines that Arrow's parser and Python's json could read differently
    b'\xef\xbb\xbf{"prompt":"bom","chosen":"b","rejected":"c"}',       # byte order mark
    b'{"prompt":"a","prompt":"dup","chosen":"b","rejected":"c"}',        # duplicate key
    b'{"prompt":5,"chosen":"b","rejected":"c"}',                          # not a string
    b'{"prompt":NaN,"chosen":"b","rejected":"c"}',
    b'{"id":null,"prompt":"nullid","chosen":"b","rejected":"c"}',
    b'{"id":"","prompt":"emptyid","chosen":"b","rejected":"c"}',
    b'{"id":7,"prompt":"numid","chosen":"b","rejected":"c"}',
    b'{"prompt":"two","chosen":"b","rejected":"c"}{"prompt":"x","chosen":"b","rejected":"c"}',
    b'{"prompt":"tail","chosen":"b","rejected":"c"} x',
    b'{"prompt":"bad \xff utf8","chosen":"b","rejected":"c"}',
    b'{"prompt":"lone \\ud800","chosen":"b","rejected":"c"}',
    b'{"prompt":"pair \\ud83d\\ude00","chosen":"b","rejected":"c"}',
    b'{"prompt":"nul \\u0000","chosen":"b","rejected":"c"}',
    b'{"prompt":"raw \x01 control","chosen":"b","rejected":"c"}',
    b'  \t ', b'\x0c', b'[1]', b'{}',
    b'{"prompt":"extra","chosen":"b","rejected":"c","source":"x"}',
    b'{"prompt":"blank","chosen":" ","rejected":"c"}',
    b'{"prompt":"crlf","chosen":"b","rejected":"c"}\r',
    b'', b'\r',  # blank lines: Python skips them
    # a line of two objects next to a blank line: as many rows as lines, yet not one per line
    b'{"prompt":"two2","chosen":"b","rejected":"c"}{"prompt":"y","chosen":"b","rejected":"c"}\n',
    b' \t\n{"prompt":"two3","chosen":"b","rejected":"c"} {"prompt":"z","chosen":"b","rejected":"c"}',
    b'\r\n{"prompt":"two4","chosen":"b","rejected":"c"}{"prompt":"w","chosen":"b","rejected":"c"}',
    b'\x0b\n{"prompt":"two5","chosen":"b","rejected":"c"}{"prompt":"v","chosen":"b","rejected":"c"}',
]


def test_arrow_json_blocks_read_every_line_as_python_does(tmp_path):
    """The JSON-lines fast path (Arrow's parser on a block of lines) gives exactly the line
    reader's records for each awkward line among plain ones, and for a truncated .gz: a block it
    cannot vouch for falls back to the line reader. Plain blocks do take the fast path."""
    from trace_ray.data.columnar import plain_json_block
    from trace_ray.data.readers import READ_SCHEMA, _datasource_cls

    plain = [json.dumps({"prompt": f"p{i} café", "chosen": f"c{i} ’ gun\n", "rejected": f"r{i} 日本"},
                        ensure_ascii=i % 2 == 0).encode() for i in range(9)]
    assert plain_json_block(b"\n".join(plain), READ_SCHEMA) is not None
    src = _datasource_cls().__new__(_datasource_cls())
    src._fmt, src._pku_chosen, src._keys, src._rows = "pairs", "better", None, 4
    for i, edge in enumerate(EDGE_LINES):
        fast = plain_json_block(b"\n".join([edge] + plain[:3]), READ_SCHEMA)
        path = tmp_path / f"edge{i}.jsonl"  # the edge line opens the second block of 4 lines
        path.write_bytes(b"\n".join(plain[:4] + [edge] + plain[4:]) + b"\n")
        with open(path, "rb") as f:
            got = pa.concat_tables(list(src._read_stream(f, str(path)))).to_pylist()
        want = list(iter_records(path, "pairs"))
        assert got == want, edge
        if fast is not None:  # Arrow read this block: its rows must be the line reader's
            by_prompt = {r["prompt"]: r for r in want}
            assert [by_prompt.get(r["prompt"]) for r in fast.to_pylist()] == fast.to_pylist(), edge
    for end in (b"", b"\n", b"\n\n", b"\n  ", b"\n" + plain[0]):  # how the file ends
        path = tmp_path / "end.jsonl"
        path.write_bytes(b"\n".join(plain[:6]) + end)
        with open(path, "rb") as f:
            got = pa.concat_tables(list(src._read_stream(f, str(path)))).to_pylist()
        assert got == list(iter_records(path, "pairs")), end
    data = gzip.compress(b"".join(line + b"\n" for line in plain * 30))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    with open(cut, "rb") as f, gzip.open(f) as g:
        got = pa.concat_tables(list(src._read_stream(g, str(cut)))).to_pylist()
    assert got == list(iter_records(cut, "pairs")) and "truncated or corrupt" in got[-1]["_error"]


def test_line_blocks_cut_the_lines_the_line_reader_sees(tmp_path):
    """The JSON-lines fast path cuts the stream into blocks of ``rows`` lines without a Python
    object per line; whatever the read size (lines and blocks across reads), its blocks hold
    exactly ``_lines``' lines and numbers, with each line's end where it is; a truncated .gz
    ends with the complete lines read before the error, then raises it, as ``_lines`` does."""
    import io

    from trace_ray.data.readers import READ_ERRORS, _line_blocks, _lines

    body = b"\n".join(EDGE_LINES[:6] + [b"", b"x" * 40, b"\r", b"y"])
    for end in (b"", b"\n", b"\n\n", b"\n  "):
        want = list(_lines(io.BytesIO(body + end)))
        for rows in (1, 2, 3, 64):
            for chunk in (1, 2, 5, 64, 1 << 20):
                got = []
                for first, data, ends in _line_blocks(io.BytesIO(body + end), rows, chunk):
                    lines = data.split(b"\n")
                    assert len(lines) == len(ends) and (len(ends) == rows or first + len(ends) > len(want))
                    assert ends == [i for i, c in enumerate(data + b"\n") if c == 10]
                    got += enumerate(lines, first)
                assert got == want, (end, rows, chunk)
    rng = random.Random(0)  # incompressible enough that half the file is more than one 1 MiB read
    data = gzip.compress(b"".join(b"%d %x\n" % (i, rng.getrandbits(400)) for i in range(40000)))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    want, error = [], None
    with gzip.open(cut) as g:
        try:
            want += _lines(g)
        except READ_ERRORS as e:
            error = type(e)
    assert error is not None and want
    got = []
    with gzip.open(cut) as g, pytest.raises(error):
        for first, data, _ in _line_blocks(g, 1000):  # reads as large as _lines'
            got += enumerate(data.split(b"\n"), first)
    assert got == want


def test_an_escaped_lone_surrogate_is_a_malformed_row_not_a_crash(tmp_path):
    """``"\\ud800"`` is valid JSON that Python decodes to a string no UTF-8 stage can hold: the Ray
    reader used to fail the whole read task on it. Now the row is kept with its reason; a proper
    surrogate pair (an emoji) stays a good row."""
    from trace_ray.data.readers import _datasource_cls

    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"prompt":"a","chosen":"b","rejected":"c"}\n'
                     b'{"prompt":"a\\ud800","chosen":"b","rejected":"c"}\n'
                     b'{"prompt":"a\\ud83d\\ude00","chosen":"b","rejected":"c"}\n')
    recs = list(iter_records(path, "pairs"))
    assert [r["_error"] is None for r in recs] == [True, False, True]
    assert "s.jsonl:2: line 2: an escape that is half a surrogate pair ('\\ud800')" in recs[1]["_error"]
    assert recs[2]["prompt"] == "a\U0001F600"
    src = _datasource_cls().__new__(_datasource_cls())
    src._fmt, src._pku_chosen, src._keys, src._rows = "pairs", "better", None, 128
    with open(path, "rb") as f:
        got = pa.concat_tables(list(src._read_stream(f, str(path)))).to_pylist()
    assert got == recs
    arr = tmp_path / "s.json"  # one JSON array of rows: the same rule
    arr.write_bytes(b"[" + b",".join(path.read_bytes().splitlines()) + b"]")
    recs = list(iter_records(arr, "pairs"))
    assert [r["_error"] is None for r in recs] == [True, False, True]
    assert "s.json:item 2: an escape that is half a surrogate pair ('\\ud800')" in recs[1]["_error"]
    with open(arr, "rb") as f:
        assert pa.concat_tables(list(src._read_stream(f, str(arr)))).to_pylist() == recs


def test_holding_finds_exactly_the_rows_that_contain_the_needle():
    """``holding`` (the "[{" check of conversation prompts) equals ``needle in row`` on every row:
    a needle split across two rows (its bytes side by side in the buffer, in no row) is in
    neither; sliced arrays, large strings, nulls and empty arrays included."""
    from trace_ray.data.columnar import holding

    rng = random.Random(1)
    pieces = ["[", "{", "[{", "a", " ", "}", "]", "é", ""]
    for _ in range(300):
        vals = [None if rng.random() < 0.1 else "".join(rng.choices(pieces, k=rng.randint(0, 4)))
                for _ in range(rng.randint(0, 12))]
        for typ in (pa.string(), pa.large_string()):
            arr = pa.array(vals, typ)
            for start in {0, min(2, len(vals))}:
                got, sub = holding(arr.slice(start), "[{"), vals[start:]
                assert got.tolist() == [v is not None and "[{" in v for v in sub], sub
    assert holding(pa.array(["ab[", "{cd"]), "[{").tolist() == [False, False]  # only across the rows


def test_maybe_blank_flags_every_blank_or_null_row_from_the_first_byte():
    """The columnar readers and triage look at Python only for rows ``maybe_blank`` flags: every
    null, empty or whitespace-only row (Unicode spaces too) must be among them, and a row starting
    with an ASCII graphic character must not (sliced arrays and large strings included)."""
    from trace_ray.data.columnar import maybe_blank

    rng = random.Random(0)
    pieces = ["", " ", "\t", "\n", "\u3000", "\xa0", "a", "Z", "~", "!", "\x7f", "é", "日", "x y", "\x00"]
    for _ in range(200):
        vals = [None if rng.random() < 0.1 else "".join(rng.choices(pieces, k=rng.randint(0, 3)))
                for _ in range(rng.randint(1, 30))]
        for typ in (pa.string(), pa.large_string()):
            arr = pa.array(vals, typ)
            for start in (0, min(3, len(vals) - 1)):
                got, sub = maybe_blank(arr.slice(start)), vals[start:]
                assert all(got[i] for i, v in enumerate(sub) if v is None or not v.strip())
                assert not any(got[i] for i, v in enumerate(sub) if v and "!" <= v[0] <= "~")
