"""GPU check, step 2: DeepSpeed ZeRO-3 training steps on CUDA, outside our trainer.

One process, bf16, a client torch AdamW (no cpu_adam build), the same batch four times: the loss
must fall and every parameter must be partitioned by ZeRO-3 (``ds_id``). Writes a JSON line.

  python scripts/gpu/ds_zero3.py OUT/model OUT/ds_zero3.json
"""

import json
import os
import socket
import sys
import time


def main(model_dir: str, out_json: str, steps: int = 4) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()  # CPU (DS_ACCELERATOR=cpu, gloo) only to check this script itself
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "gradient_clipping": 1.0,
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    texts = ["The policy changed: answers give no step-by-step detail on these topics."] * 4
    enc = tok(texts, return_tensors="pt", padding=True).to(engine.device)
    losses = []
    for _ in range(steps):
        out = engine(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=enc["input_ids"])
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss.detach().float()))
    params = list(engine.module.parameters())
    result = {
        "ok": losses[-1] < losses[0] and all(hasattr(p, "ds_id") for p in params),
        "zero_stage": engine.zero_optimization_stage(),
        "losses": losses,
        "partitioned_params": sum(hasattr(p, "ds_id") for p in params),
        "params": len(params),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }
    with open(out_json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
