"""Benchmark: rule triage on Ray Data vs a plain single-process Python loop, same rows, same run.

    .venv/bin/python benchmarks/triage.py                     # 100,000 pairs, 4 shards, local Ray
    .venv/bin/python benchmarks/triage.py --pairs 20000 --num-cpus 2

Generates ``--pairs`` synthetic preference pairs (seeded; ~8% of responses trip the policy) as
``--shards`` JSON-lines files, then times, end to end (read → judge both responses → write
Parquet), (1) ``run_triage`` on Ray Data and (2) ``iter_records`` + ``triage_records`` in one
process writing the same Parquet columns. Both must agree on every count. Writes rows/s of each
and their ratio to ``benchmarks/results/triage.json``. Ray start-up is excluded (a long-lived
cluster pays it once). The Ray Data pipeline runs twice: ``ray_data_cold`` is the first run of the
session (worker processes start and import the libraries), ``ray_data`` the second (warm);
per-run planning and task scheduling are included in both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the a you can should will it this that to of and in for with on your my we they answer help "
         "question time people place think good idea safe check before after maybe always never "
         "recipe garden weather travel music book friend family money school work health").split()
BAD = ["gun", "knife", "steal", "hack", "idiot", "cocaine", "bomb"]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def response(rng: random.Random) -> str:
    parts = [sentence(rng, rng.randint(6, 14)) for _ in range(rng.randint(2, 5))]
    r = rng.random()
    if r < 0.05:
        parts.insert(rng.randrange(len(parts)), f"You could use a {rng.choice(BAD)} for that.")
    elif r < 0.08:
        parts = [f"{i}. {p}" for i, p in enumerate(parts, 1)]
    return "\n".join(parts) if parts[0][:2] == "1." else " ".join(parts)


def generate(folder: Path, pairs: int, shards: int, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    files = [folder / f"pairs-{i:03d}.jsonl" for i in range(shards)]
    handles = [f.open("w") for f in files]
    for i in range(pairs):
        row = {"prompt": sentence(rng, rng.randint(5, 15)) + "?", "chosen": response(rng), "rejected": response(rng)}
        handles[i % shards].write(json.dumps(row) + "\n")
    for h in handles:
        h.close()
    return files


def plain_loop(data: Path, policy, out: Path, batch: int = 1024) -> Counter:
    """The baseline: one Python process, same reader, same triage function, same Parquet columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trace_ray.data.readers import iter_records
    from trace_ray.data.schema import TRIAGED
    from trace_ray.triage import triage_records

    counts: Counter = Counter()
    buf: list = []
    with pq.ParquetWriter(out, TRIAGED) as w:
        def flush():
            rows = triage_records(policy, buf)
            counts.update(r["category"] for r in rows)
            w.write_table(pa.Table.from_pylist(rows, schema=TRIAGED))
            buf.clear()

        for rec in iter_records(data, "pairs"):
            buf.append(rec)
            if len(buf) >= batch:
                flush()
        if buf:
            flush()
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=100_000, help="number of generated pairs (default 100000)")
    ap.add_argument("--shards", type=int, default=4, help="input files; Ray reads one file per task (default 4)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    ap.add_argument("--batch-size", type=int, default=1024, help="rows per map_batches call (default 1024)")
    ap.add_argument("--policy", default=str(ROOT / "configs/policies/hh_harmless_v2.yaml"),
                    help="policy YAML (default: the HH text policy: keywords + regex)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/triage.json"), help="result JSON path")
    args = ap.parse_args()

    import ray

    from trace_ray.policy import load_policy
    from trace_ray.ray_utils import ensure_ray
    from trace_ray.triage import run_triage

    policy = load_policy(args.policy)
    with tempfile.TemporaryDirectory(prefix="trace_bench_") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        data.mkdir()
        t = time.perf_counter()
        generate(data, args.pairs, args.shards)
        gen_s = time.perf_counter() - t
        ensure_ray(num_cpus=args.num_cpus)
        cpus = int(ray.cluster_resources().get("CPU", 0))

        t = time.perf_counter()
        loop_counts = plain_loop(data, policy, tmp / "loop.parquet", args.batch_size)
        loop_s = time.perf_counter() - t

        # cold: the first Ray Data run in this Ray session (workers start, import trace_ray/pyarrow);
        # warm: the same run again, as on a long-lived cluster
        times = []
        for run in ("cold", "warm"):
            t = time.perf_counter()
            summary = run_triage(data, policy, tmp / f"ray_{run}", "pairs", batch_size=args.batch_size,
                                 show_progress=False)
            times.append(time.perf_counter() - t)
        ray_cold_s, ray_s = times

    assert summary["total"] == args.pairs == sum(loop_counts.values())
    assert summary["counts"] == {c: loop_counts.get(c, 0) for c in summary["counts"]}, (summary["counts"], loop_counts)
    result = {
        "benchmark": "triage: Ray Data pipeline vs plain single-process loop (same rows, same run)",
        "pairs": args.pairs,
        "shards": args.shards,
        "batch_size": args.batch_size,
        "policy": policy.fingerprint,
        "ray_cpus": cpus,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "generate_s": round(gen_s, 2),
        "plain_loop": {"seconds": round(loop_s, 2), "rows_per_s": round(args.pairs / loop_s, 1)},
        "ray_data": {"seconds": round(ray_s, 2), "rows_per_s": round(args.pairs / ray_s, 1)},
        "ray_data_cold": {"seconds": round(ray_cold_s, 2), "rows_per_s": round(args.pairs / ray_cold_s, 1)},
        "ratio_ray_over_loop": round(loop_s / ray_s, 3),
        "ratio_ray_cold_over_loop": round(loop_s / ray_cold_s, 3),
        "counts": summary["counts"],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
