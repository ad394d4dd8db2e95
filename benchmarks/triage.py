"""Benchmark: rule triage at scale — Ray Data vs a plain loop vs the bare regex limit, same run.

    .venv/bin/python benchmarks/triage.py                          # 1,000,000 and 100,000 pairs (~10 min idle)
    .venv/bin/python benchmarks/triage.py --input parquet          # the same rows as Parquet shards
    .venv/bin/python benchmarks/triage.py --pairs 200000 --small 50000 --loop-rows 20000   # a quick look
    .venv/bin/python benchmarks/triage.py --judge-pairs 16           # + the HF judge on CPU (SmolLM2)

Data: ``--pairs`` generated preference pairs of realistic length: prompts of the real HH-RLHF test
file, responses of 200-2,000 characters built from its sentences (curly quotes, other Unicode and
all), ``--rows-per-shard`` rows per file (so the file count, not the file size, grows with the
rows), JSON lines or Parquet (``--input``). Policy: the HH text policy (3 keyword rules + 1 regex
rule). Each measurement runs in its own fresh process (clean memory figures):

- ``regex_limit``: the policy's patterns alone on the responses of one shard held in memory, one
  thread: the policy's RE2 set (the vectorised engine: one pass per response for all patterns) and
  the ``regex`` module (the row-wise engine), in rows/s (a row = both responses).
- ``plain_loop``: ``iter_records`` + ``triage_records`` (the row-wise reference) + one
  ``ParquetWriter``, one process, over the first ``--loop-rows`` rows (default 100,000).
- ``ray``: ``run_triage`` on a fresh local Ray with 1 and 2 CPUs, on ``--small`` and ``--pairs`` rows,
  after a warm-up run on one shard per CPU (so that every worker has started and imported
  before the clock starts, as on a long-lived cluster; the warm-up's own time is recorded as
  ``warmup_s``), then ``--repeats`` measured runs (default 3; the cell's figures are the median
  run's, every run is listed under ``runs``). Peak RSS of the driver and of the Ray worker
  processes (the largest of the runs), and the CPU seconds of all of them, of which the kernel's
  (sampled every 0.5 s; on a shared machine rows per CPU-second is the steadier figure).
- ``equality``: the 2-CPU output of the largest run against the row-wise reference
  (``triage_records``) on EVERY row (2 processes, one shard at a time), row for row: id, meta,
  verdicts, reasons, category.
- ``hf_judge`` (``--judge-pairs N``): the HF judge (``configs/policies/hh_judge_smollm2.yaml``,
  SmolLM2-135M on CPU, 1 actor) end to end, model load included.

Writes ``benchmarks/results/triage.json`` (with the load average before and after: the machine is
shared, so compare ratios within one run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import HH  # noqa: E402

POLICY = ROOT / "configs/policies/hh_harmless_v2.yaml"
JUDGE_POLICY = ROOT / "configs/policies/hh_judge_smollm2.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=1_000_000, help="rows of the large run (default 1000000)")
    p.add_argument("--small", type=int, default=100_000, help="rows of the small run, for memory vs rows (default 100000)")
    p.add_argument("--rows-per-shard", type=int, default=25_000, help="rows per input file (default 25000)")
    p.add_argument("--input", choices=["jsonl", "parquet"], default="jsonl", help="input file format (default jsonl)")
    p.add_argument("--chars", type=int, nargs=2, default=[200, 2000], metavar=("MIN", "MAX"),
                   help="response length range in characters (default 200 2000; the real HH test file: ~190 mean)")
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="local Ray CPU counts to run (default 1 2)")
    p.add_argument("--loop-rows", type=int, default=100_000, help="rows for the plain loop (default 100000)")
    from trace_ray.triage_output import COMPRESSIONS

    p.add_argument("--compression", default="snappy", choices=COMPRESSIONS,
                   help="Parquet codec of the Ray runs' output (run_triage's compression; default snappy)")
    p.add_argument("--repeats", type=int, default=3,
                   help="measured runs of each Ray cell, one after another on the same workers; the cell reports "
                        "the median run (of an even count, the slower middle one) and lists every run (default 3)")
    p.add_argument("--no-equality", action="store_true", help="skip the row-for-row check of every row")
    p.add_argument("--judge-pairs", type=int, default=0, help="pairs for the HF judge measurement (default 0: skip)")
    p.add_argument("--policy", default=str(POLICY), help="rule policy YAML (default: the HH text policy)")
    p.add_argument("--data", default=str(HH), help="HH-RLHF file whose prompts/sentences make the text")
    p.add_argument("--work", default=None, help="folder for generated data and outputs (default: a temp folder, removed)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/triage.json"), help="result JSON path")
    p.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON spec
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------- data
def sentence_pool(path: str) -> tuple[list[str], list[str]]:
    """Prompts (as plain transcripts) and response sentences of the real HH-RLHF file (a small
    built-in pool without it)."""
    from trace_ray.chat import transcript
    from trace_ray.data.readers import iter_records

    prompts, sents = [], []
    if Path(path).exists():
        for rec in iter_records(path, "hh"):
            if rec["_error"]:
                continue
            prompts.append(transcript(rec["prompt"]))  # a plain-text prompt (TRL's standard format)
            for side in ("chosen", "rejected"):
                sents += [s for s in re.split(r"(?<=[.!?])\s+", rec[side]) if s]
    if not sents:
        words = "the a you can should will it answer help question time people think idea safe check".split()
        rng = random.Random(1)
        sents = [" ".join(rng.choice(words) for _ in range(10)).capitalize() + "." for _ in range(2000)]
        prompts = ["\n\nHuman: " + s + "\n\nAssistant:" for s in sents[:500]]
    return prompts, sents


def generate(folder: Path, pairs: int, per_shard: int, fmt: str, data: str, seed: int,
             chars: tuple[int, int] = (200, 2000)) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts, sents = sentence_pool(data)
    rng = random.Random(seed)

    def response() -> str:
        want, out, n = rng.randint(*chars), [], 0
        while n < want:
            s = rng.choice(sents)
            out.append(s)
            n += len(s) + 1
        return " ".join(out)

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k, start in enumerate(range(0, pairs, per_shard)):
        rows = [{"prompt": rng.choice(prompts), "chosen": response(), "rejected": response()}
                for _ in range(min(per_shard, pairs - start))]
        path = folder / f"pairs-{k:05d}.{fmt}"
        if fmt == "parquet":
            pq.write_table(pa.Table.from_pylist(rows), path)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(path)
    return files


# ----------------------------------------------------------------------------------- memory
class Peak:
    """Peak RSS (MB) of this process and of the Ray worker processes below it, and the CPU seconds
    this process and every process below it used (sampled every 0.5 s), and how many of them the
    kernel spent (system time: page cache, reads and writes): on a shared machine the CPU seconds
    show what the run cost where the wall time also shows who else ran."""

    def __init__(self):
        import psutil

        self.me = psutil.Process()
        self.driver = self.worker_max = self.worker_sum = 0.0
        self.cpu0: dict[int, tuple[float, float]] = {}  # pid -> (user, system) seconds
        self.cpu1: dict[int, tuple[float, float]] = {}
        self.kind: dict[int, str] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self, first: bool = False):
        self.driver = max(self.driver, self.me.memory_info().rss / 2**20)
        rss = []
        for p in [self.me] + self.me.children(recursive=True):
            try:
                worker = p is not self.me and p.cmdline()[:1] and p.cmdline()[0].startswith("ray::")
                t = p.cpu_times()
                used = (t.user, t.system)
                self.kind.setdefault(p.pid, "driver" if p is self.me else "workers" if worker else "ray_services")
                if first:
                    self.cpu0[p.pid] = used
                self.cpu1[p.pid] = used
                if worker:
                    rss.append(p.memory_info().rss / 2**20)
            except Exception:  # noqa: BLE001 - a process ended between listing and reading
                pass
        if rss:
            self.worker_max = max(self.worker_max, max(rss))
            self.worker_sum = max(self.worker_sum, sum(rss))

    def _run(self):
        while not self._stop.wait(0.5):
            self._sample()

    def __enter__(self):
        self._sample(first=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()
        return False

    def to_dict(self) -> dict:
        split: dict[str, float] = {}
        system = 0.0
        for pid, (user, sys_) in self.cpu1.items():
            user0, sys0 = self.cpu0.get(pid, (0.0, 0.0))
            split[self.kind[pid]] = split.get(self.kind[pid], 0.0) + user - user0 + sys_ - sys0
            system += sys_ - sys0
        return {"driver_peak_rss_mb": round(self.driver, 1), "worker_peak_rss_mb": round(self.worker_max, 1),
                "workers_sum_peak_rss_mb": round(self.worker_sum, 1), "cpu_seconds": round(sum(split.values()), 2),
                "cpu_system_seconds": round(system, 2),
                "cpu_seconds_by_process": {k: round(v, 2) for k, v in sorted(split.items())}}


# ----------------------------------------------------------------------------------- cells
def cell_regex_limit(spec: dict) -> dict:
    """The policy's patterns alone on one shard's responses in memory (one thread)."""
    import pyarrow as pa

    from trace_ray.data.columnar import utf8_rows
    from trace_ray.data.readers import iter_records
    from trace_ray.policy import load_policy
    from trace_ray.policy.vector import compiled_set, set_patterns

    policy = load_policy(spec["policy"])
    recs = list(iter_records(spec["shard"], "pairs"))
    texts = [r[s] for r in recs for s in ("chosen", "rejected")]
    arr = pa.array(texts, pa.string())
    data, off = utf8_rows(arr)
    match = compiled_set(set_patterns(policy.rules, "response"))._set.Match  # as triage calls it
    for i in range(10):  # warm up
        match(data[off[i]: off[i + 1]])
    t = time.perf_counter()
    for i in range(len(texts)):
        match(data[off[i]: off[i + 1]])
    re2_s = time.perf_counter() - t
    sample = texts[: min(len(texts), 20_000)]
    t = time.perf_counter()
    for text in sample:
        for r in policy.rules:
            for pat in r._compiled:
                pat.search(text, timeout=r.timeout_s)
    py_s = time.perf_counter() - t
    return {"rows": len(recs), "mb_of_text": round(arr.nbytes / 1e6, 1),
            "re2_rows_per_s": round(len(recs) / re2_s), "re2_mb_per_s": round(arr.nbytes / 1e6 / re2_s),
            "regex_module_rows_per_s": round(len(sample) / 2 / py_s),
            "note": "one thread; RE2 = the policy's RE2 set as triage runs it (every pattern, the non-ASCII "
                    "word characters and the sentinel in one google-re2 Set) matched once per response; regex "
                    "module = every pattern's search per response, as the row-wise path (on up to 10,000 rows)"}


def cell_plain_loop(spec: dict) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trace_ray.data.readers import iter_records
    from trace_ray.data.schema import TRIAGED
    from trace_ray.policy import load_policy
    from trace_ray.triage import triage_records

    policy = load_policy(spec["policy"])
    n, buf = 0, []
    with Peak() as mem, pq.ParquetWriter(spec["out"], TRIAGED) as w:
        t = time.perf_counter()
        for rec in iter_records(spec["data"], "pairs"):
            buf.append(rec)
            if len(buf) == 4096 or n + len(buf) == spec["rows"]:
                w.write_table(pa.Table.from_pylist(triage_records(policy, buf), schema=TRIAGED))
                n += len(buf)
                buf = []
                if n == spec["rows"]:
                    break
        if buf:
            w.write_table(pa.Table.from_pylist(triage_records(policy, buf), schema=TRIAGED))
            n += len(buf)
        secs = time.perf_counter() - t
    m = mem.to_dict()
    return {"rows": n, "seconds": round(secs, 2), "rows_per_s": round(n / secs, 1),
            "rows_per_cpu_s": round(n / m["cpu_seconds"], 1), **m}


def cell_ray(spec: dict) -> dict:
    from trace_ray.ray_utils import ensure_ray
    from trace_ray.triage import run_triage

    ensure_ray(num_cpus=spec["cpus"])
    t = time.perf_counter()
    run_triage(spec["warmup"], spec["policy"], spec["out"] + "_warmup", "pairs", show_progress=False)
    warmup_s = time.perf_counter() - t
    runs = []
    for _ in range(spec["repeats"]):  # each run replaces the last one's output
        with Peak() as mem:
            t = time.perf_counter()
            s = run_triage(spec["data"], spec["policy"], spec["out"], "pairs", show_progress=False,
                           compression=spec["compression"])
            secs = time.perf_counter() - t
        m = mem.to_dict()
        runs.append({"seconds": round(secs, 2), "rows_per_s": round(s["total"] / secs, 1),
                     "rows_per_cpu_s": round(s["total"] / m["cpu_seconds"], 1), **m})
    head = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]  # the median run (of two: the slower)
    memory = {k: max(r[k] for r in runs) for k in ("driver_peak_rss_mb", "worker_peak_rss_mb", "workers_sum_peak_rss_mb")}
    out_mb = sum(f.stat().st_size for f in (Path(spec["out"]) / "triaged.parquet").glob("*.parquet")) / 2**20
    return {"rows": s["total"], "cpus": spec["cpus"], "warmup_s": round(warmup_s, 2), "compression": spec["compression"],
            "output_mb": round(out_mb), **head, **memory, "runs": runs,
            "counts": s["counts"], "engines": s["engines"],
            "part_files": len([f for f in os.listdir(Path(spec["out"]) / "triaged.parquet") if f.endswith(".parquet")])}


def cell_judge(spec: dict) -> dict:
    from trace_ray.ray_utils import ensure_ray
    from trace_ray.triage import run_triage

    ensure_ray(num_cpus=2)
    t = time.perf_counter()
    s = run_triage(spec["data"], spec["policy"], spec["out"], "pairs", show_progress=False, num_actors=1)
    secs = time.perf_counter() - t
    return {"rows": s["total"], "seconds": round(secs, 1), "rows_per_s": round(s["total"] / secs, 3),
            "counts": s["counts"], "note": "1 HFJudge actor (SmolLM2-135M-Instruct, CPU, fp32), 2 generations "
                                           "per row; model load (~20 s) included"}


def run_cell(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--cell", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"cell {spec['kind']} failed:\n{res.stderr[-4000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"  {spec['kind']} {json.dumps({k: v for k, v in out.items() if k not in ('engines', 'note')})}", flush=True)
    return out


def subset(folder: Path, files: list[Path], rows: int, per_shard: int, name: str) -> Path:
    """A folder of links to the first shards holding ``rows`` rows."""
    sub = folder / name
    sub.mkdir(exist_ok=True)
    for f in files[: -(-rows // per_shard)]:
        link = sub / f.name
        if not link.exists():
            link.symlink_to(f)
    return sub


EQ_COLUMNS = ["id", "meta", "chosen_verdict", "rejected_verdict", "reasons", "category"]


def _rowwise_shard(args) -> "object":
    """The row-wise reference's columns for one shard (a pool worker)."""
    import pyarrow as pa

    from trace_ray.data.readers import iter_records
    from trace_ray.policy import load_policy
    from trace_ray.triage import triage_records

    policy_path, shard = args
    rows = triage_records(load_policy(policy_path), list(iter_records(shard, "pairs")))
    return pa.Table.from_pylist([{k: r[k] for k in EQ_COLUMNS} for r in rows])


def cell_equality(spec: dict) -> dict:
    """Every row of the Ray output against the row-wise reference, in input order."""
    from multiprocessing import get_context

    import pyarrow as pa
    import pyarrow.parquet as pq

    t = time.perf_counter()
    with get_context("spawn").Pool(spec["processes"]) as pool:
        want = pa.concat_tables(pool.map(_rowwise_shard, [(spec["policy"], f) for f in spec["shards"]]))
    got = pq.read_table(spec["ray_out"], columns=EQ_COLUMNS)
    same = got.num_rows == want.num_rows and got.equals(want.cast(got.schema))
    bad = None
    if not same and got.num_rows == want.num_rows:
        for k in EQ_COLUMNS:
            diff = [i for i, (a, b) in enumerate(zip(got[k].to_pylist(), want[k].to_pylist())) if a != b]
            if diff:
                bad = {"column": k, "rows": len(diff), "first": diff[0]}
                break
    return {"rows": got.num_rows, "identical": bool(same), "first_difference": bad, "columns": EQ_COLUMNS,
            "reference_seconds": round(time.perf_counter() - t, 1),
            "note": "Ray output (vectorised rules, 2 CPUs) vs triage_records (row-wise reference) on every row"}


CELLS = {"regex_limit": cell_regex_limit, "plain_loop": cell_plain_loop, "ray": cell_ray, "judge": cell_judge,
         "equality": cell_equality}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    if args.cell:
        spec = json.loads(args.cell)
        print(json.dumps(CELLS[spec["kind"]](spec)))
        return 0
    started, load0 = time.time(), os.getloadavg()
    work = Path(args.work or tempfile.mkdtemp(prefix="trace_triage_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    policy = str(Path(args.policy).resolve())
    print(f"generating {args.pairs} pairs in {work} ...", flush=True)
    t = time.perf_counter()
    files = generate(work / "data", args.pairs, args.rows_per_shard, args.input, args.data, args.seed, tuple(args.chars))
    gen_s = time.perf_counter() - t
    sizes = sorted({min(args.small, args.pairs), args.pairs})
    folders = {n: subset(work, files, n, args.rows_per_shard, f"rows_{n}") for n in sizes}
    warm = subset(work, files, args.rows_per_shard * max(args.cpus), args.rows_per_shard, "warmup")  # a shard per CPU
    result: dict = {
        "benchmark": "rule triage at scale: Ray Data (vectorised rules, writers on the workers) vs a plain "
                     "single-process loop (row-wise) vs the bare regex limit, same data, same run",
        "command": "python benchmarks/triage.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": {"pairs": args.pairs, "rows_per_shard": args.rows_per_shard, "input": args.input,
                 "response_chars": f"{args.chars[0]}-{args.chars[1]}", "sentences_from": str(args.data),
                 "generate_s": round(gen_s, 1),
                 "input_mb": round(sum(f.stat().st_size for f in files) / 2**20)},
        "policy": policy,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    result["regex_limit"] = run_cell({"kind": "regex_limit", "policy": policy, "shard": str(files[0])})
    result["ray"] = []
    for n in sizes:
        for cpus in args.cpus:
            result["ray"].append(run_cell({"kind": "ray", "cpus": cpus, "policy": policy, "data": str(folders[n]),
                                           "warmup": str(warm), "out": str(work / f"out_{n}_{cpus}"),
                                           "compression": args.compression, "repeats": args.repeats}))
    loop_rows = min(args.loop_rows, args.pairs)
    result["plain_loop"] = run_cell({"kind": "plain_loop", "policy": policy, "data": str(work / "data"),
                                     "rows": loop_rows, "out": str(work / "loop.parquet")})
    if not args.no_equality:
        result["equality"] = run_cell({"kind": "equality", "policy": policy, "processes": max(args.cpus),
                                       "shards": [str(f) for f in files],
                                       "ray_out": str(work / f"out_{args.pairs}_{max(args.cpus)}" / "triaged.parquet")})
    if args.judge_pairs:
        jdir = subset(work, generate(work / "judge_data", args.judge_pairs, args.judge_pairs, "jsonl", args.data,
                                     args.seed + 1), args.judge_pairs, args.judge_pairs, "judge")
        result["hf_judge"] = run_cell({"kind": "judge", "policy": str(JUDGE_POLICY), "data": str(jdir),
                                       "out": str(work / "judge_out")})
    loop = result["plain_loop"]["rows_per_s"]
    limit = result["regex_limit"]["re2_rows_per_s"]
    loop_cpu = result["plain_loop"]["rows_per_cpu_s"]
    result["ratios"] = {f"ray_{r['rows']}_rows_{r['cpus']}cpu": {
        "rows_per_s": r["rows_per_s"], "x_plain_loop": round(r["rows_per_s"] / loop, 2),
        "rows_per_cpu_s": r["rows_per_cpu_s"], "x_plain_loop_per_cpu_s": round(r["rows_per_cpu_s"] / loop_cpu, 2),
        "share_of_re2_limit_per_cpu": round(r["rows_per_s"] / (limit * r["cpus"]), 3)} for r in result["ray"]}
    by = {(r["rows"], r["cpus"]): r for r in result["ray"]}
    if len(sizes) == 2:
        result["driver_memory_vs_rows"] = {
            f"{c}cpu": {f"{n}_rows_mb": by[(n, c)]["driver_peak_rss_mb"] for n in sizes} for c in args.cpus}
    result["goals"] = {
        "rows_per_s_2cpu_ge_50000": any(r["cpus"] == 2 and r["rows"] == args.pairs and r["rows_per_s"] >= 50_000
                                        for r in result["ray"]),
        "driver_memory_flat": all(abs(by[(sizes[-1], c)]["driver_peak_rss_mb"] - by[(sizes[0], c)]["driver_peak_rss_mb"])
                                  < 64 for c in args.cpus) if len(sizes) == 2 else None,
    }
    result["loadavg_start"], result["loadavg_end"] = load0, os.getloadavg()
    result["wall_s"] = round(time.time() - started, 1)
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ratios", "goals", "loadavg_start", "loadavg_end")}, indent=2))
    if not args.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
