"""Plumbing shared by the job entry points: import path, Ray connection, exit codes.

Jobs run as ``ray job submit --working-dir . -- python jobs/<name>.py ...``; the uploaded working
directory is the current directory, so repo-relative paths in configs work. Logic lives in
``trace_ray.pipeline`` / ``trace_ray.stages``; this file only wires arguments to it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python jobs/x.py` from a checkout without `pip install -e .`
    sys.path.insert(0, ROOT)

from trace_ray.pipeline import EXIT_CODES, guarded  # noqa: E402

EPILOG = "exit codes: " + "; ".join(f"{k} = {v}" for k, v in EXIT_CODES.items())


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None,
                   help="Ray address to join (default: RAY_ADDRESS, set by `ray job submit`; else a local Ray)")
    p.add_argument("--force", action="store_true",
                   help="rerun even when the output already holds a finished marker for the same inputs")
    p.add_argument("--result", default=None,
                   help="also write the job's result JSON to this path or URI")
    return p


def main(prog: str, work, result_path: str | None = None) -> None:
    """Run ``work() -> dict`` guarded; print its result (and write it to ``result_path``, the
    ``--result`` option, when given); exit with the documented code."""
    def body():
        result = work()
        if result_path:
            from trace_ray.storage import write_json

            write_json(result_path, result)
        print(json.dumps(result, indent=2, default=str), flush=True)

    sys.exit(guarded(body, prog))


def connect(address: str | None) -> None:
    from trace_ray.ray_utils import ensure_ray

    ensure_ray(address)
