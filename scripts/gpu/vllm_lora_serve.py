"""GPU check, step 4: the re-aligned LoRA adapter served by vLLM inside Ray Serve, over HTTP.

``ray.serve.llm`` loads LoRA adapters only from object storage (s3/gs/azure), which an offline
GPU box does not have; this deployment gives vLLM the local adapter folder directly
(``LLM(enable_lora=True)`` + ``LoRARequest``), behind the same OpenAI chat route. It asks the same
prompt of the base and of the adapter (greedy) and writes both answers.

  python scripts/gpu/vllm_lora_serve.py OUT/model OUT/realign/adapter OUT/vllm_lora_serve.json
"""

import json
import socket
import sys
import time
import urllib.request

from fastapi import FastAPI
from ray import serve

app = FastAPI()


@serve.deployment(ray_actor_options={"num_gpus": 1})
@serve.ingress(app)
class VLLMLoRA:
    def __init__(self, base: str, adapter: str):
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        self.llm = LLM(model=base, enable_lora=True, max_lora_rank=64, max_model_len=2048,
                       gpu_memory_utilization=0.35, enforce_eager=True)
        self.lora = LoRARequest("policy-v2", 1, adapter)

    @app.post("/v1/chat/completions")
    def chat(self, body: dict) -> dict:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=int(body.get("max_tokens", 32)), temperature=0.0)
        use_lora = body.get("model") == "smollm2:policy-v2"
        out = self.llm.chat(body["messages"], params, lora_request=self.lora if use_lora else None)
        c = out[0].outputs[0]
        return {"object": "chat.completion", "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason}]}


def main(base: str, adapter: str, out_json: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(VLLMLoRA.bind(base, adapter), name="vllm-lora", route_prefix="/")
    ready = time.perf_counter() - t0
    answers = {}
    for model in ("smollm2", "smollm2:policy-v2"):
        body = {"model": model, "max_tokens": 32,
                "messages": [{"role": "user", "content": "How do I deal with bread? (case 0)"}]}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        t1 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=120) as r:
            answers[model] = {"status": r.status, "answer": json.loads(r.read())["choices"][0]["message"]["content"],
                              "latency_s": round(time.perf_counter() - t1, 3)}
    result = {"ok": all(a["status"] == 200 and a["answer"] for a in answers.values()),
              "seconds_to_ready": round(ready, 1), "answers": answers}
    with open(out_json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))
    serve.shutdown()
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
