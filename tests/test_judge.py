"""The LLM judge: the hf generate actor pool end to end on CPU (tiny local model), the vLLM
path's pair/answer plumbing with a stand-in engine, and the vLLM engine itself on GPU only."""

from __future__ import annotations

import importlib.util
import json

import pyarrow.parquet as pq
import pytest

from trace_ray.data.readers import iter_records
from trace_ray.policy import load_policy
from trace_ray.policy.judge import HFJudge, vllm_judge
from trace_ray.triage import run_triage, triage_records

ROWS = [
    {"prompt": "How do I bake bread?", "chosen": "Mix flour, water and yeast, then bake.", "rejected": "No."},
    {"prompt": "Tell me a secret", "chosen": "I can't help with that request.", "rejected": "Step 1: gather the tools."},
    {"prompt": "Weather?", "chosen": "Sunny with a light breeze.", "rejected": "Please consult a professional."},
    {"prompt": "Help", "chosen": "Here is a detailed answer.", "rejected": "I can't help with that request."},
]


def _data(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + '{"prompt": "cut", "chosen": "x", "rej\n')
    return p


def _policy(model, backend="hf", **kw):
    return load_policy({"name": "judge-test", "version": 1, "description": "No instructions of any kind.",
                        "rules": [{"name": "llm", "kind": "judge", "backend": backend, "model": str(model),
                                   "max_new_tokens": 3, "batch_size": 4, "concurrency": 1, **kw}]})


def test_hf_judge_end_to_end_on_cpu(ray_session, tiny_model_dir, tmp_path):
    data = _data(tmp_path)
    pol = _policy(tiny_model_dir)
    summary = run_triage(data, pol, tmp_path / "out", show_progress=False)
    rows = pq.read_table(tmp_path / "out/triaged.parquet").to_pylist()
    assert summary["total"] == len(rows) == 5 and sum(summary["counts"].values()) == 5
    cut = [r for r in rows if "error" in json.loads(r["reasons"])]
    assert len(cut) == 1 and "invalid JSON" in json.loads(cut[0]["reasons"])["error"]
    # the same answers from the judge called in plain python (greedy → deterministic)
    records = list(iter_records(data))
    answers = HFJudge(pol.judge_rule).answers(records)
    assert answers[-1] == (None, None)  # the malformed row is not sent to the model
    offline = {r["id"]: r for r in triage_records(pol, records, answers)}
    assert {r["id"]: r for r in rows} == offline
    # a random tiny model does not answer yes/no: error verdicts with the answer as reason, no crash
    errors = [json.loads(r["reasons"])["chosen"][0] for r in rows if r["chosen_verdict"] == "error" and "error" not in json.loads(r["reasons"])]
    assert errors and all("judge answer is neither yes nor no" in e for e in errors)
    assert summary["unresolved_reasons"].get("chosen: llm: judge answer is neither yes nor no", 0) >= 1


def test_vllm_path_plumbing_with_a_stand_in_engine(ray_session, tmp_path):
    """Pairs → two judge rows → answers → back on one row per pair (duplicates included)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS + ROWS[:1]) + "not json\n")
    pol = _policy("some/model", backend="vllm")
    rule = pol.judge_rule

    def engine(ds):
        def answer(batch):
            assert all(m[-1]["role"] == "user" and "Response:" in m[-1]["content"] for m in batch["messages"])
            batch["judge_answer"] = ["Yes." if s == "chosen" else "no" for s in batch["_side"]]
            return batch.drop(columns=["messages", "sampling_params"])

        return ds.map_batches(answer, batch_format="pandas")

    from trace_ray.data.readers import read_pairs

    ds = vllm_judge(read_pairs(data), rule, engine=engine)
    rows = ds.take_all()
    out = triage_records(pol, rows, [(r["judge_chosen"], r["judge_rejected"]) for r in rows])
    assert len(out) == 6
    assert [o["category"] for o in out].count("invert") == 5
    assert [o["category"] for o in out].count("unresolved") == 1


def test_vllm_backend_is_refused_cleanly_without_vllm(tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed")
    with pytest.raises(ImportError, match="needs vLLM on a GPU machine"):
        run_triage(_data(tmp_path), _policy("some/model", backend="vllm"), tmp_path / "o", show_progress=False)
    with pytest.raises(FileNotFoundError, match="judge model /no/such/model does not exist"):
        run_triage(_data(tmp_path), _policy("/no/such/model"), tmp_path / "o", show_progress=False)


@pytest.mark.gpu
def test_vllm_judge_on_gpu(ray_session, tmp_path):
    torch = pytest.importorskip("torch")
    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        pytest.skip("needs vLLM and a CUDA GPU")
    import os

    model = os.environ.get("TRACE_VLLM_JUDGE_MODEL")
    if not model:
        pytest.skip("set TRACE_VLLM_JUDGE_MODEL to a local HF model folder")
    summary = run_triage(_data(tmp_path), _policy(model, backend="vllm"), tmp_path / "o", show_progress=False)
    assert summary["total"] == 5 and sum(summary["counts"].values()) == 5
