"""``trace-ray evaluate``: SynthShift metrics of a model (TPA, collateral, utility, style probabilities).

    trace-ray evaluate --model runs/demo/runs/trace/model --reference runs/demo/reference --out metrics.json
"""

from __future__ import annotations

HELP = "evaluate a model on SynthShift's held-out prompts against the new policy"


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help=HELP, description=HELP + " (writes metrics.json).")
    p.add_argument("--model", required=True, help="model to evaluate: an HF folder or a peft adapter folder")
    p.add_argument("--reference", default=None,
                   help="the reference model folder (for collateral damage and KL); default: none (those metrics are skipped)")
    p.add_argument("--policy", default=None, help="policy YAML used as the oracle (default configs/synthshift/policy.yaml)")
    p.add_argument("--split", default="test", choices=["test", "val", "train"], help="which prompts (default test)")
    p.add_argument("--num-samples", type=int, default=4, help="sampled answers per prompt (default 4)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--world-seed", type=int, default=0, help="SynthShift world seed (default 0, as the demo)")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="generation: transformers (CPU/GPU) or vLLM (GPU)")
    p.add_argument("--stride", type=int, default=1, help="evaluate every k-th prompt only (quick checks; default 1 = all)")
    p.add_argument("--out", default="metrics.json", help="output JSON path (default metrics.json)")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from trace_ray.data.synthshift import POLICY_PATH, WorldConfig, build_world
    from trace_ray.evaluate import REF_KEYS, evaluate_model, load_for_eval, policy_oracle, write_metrics
    from trace_ray.policy import load_policy

    for p in [args.model] + ([args.reference] if args.reference else []):
        if not Path(p).exists():
            raise FileNotFoundError(f"model folder {p} does not exist")
    policy = load_policy(args.policy or POLICY_PATH)
    world = build_world(WorldConfig(seed=args.world_seed))
    model, tok = load_for_eval(args.model)
    ref = ref_summary = None
    if args.reference:
        ref, _ = load_for_eval(args.reference)
        rm = evaluate_model(ref, tok, world, oracle=policy_oracle(policy), split=args.split,
                            num_samples=args.num_samples, temperature=args.temperature, seed=args.seed,
                            stride=args.stride)
        ref_summary = {k: rm[k] for k in REF_KEYS}
    m = evaluate_model(model, tok, world, oracle=policy_oracle(policy), ref_model=ref, ref_summary=ref_summary,
                       split=args.split, num_samples=args.num_samples, temperature=args.temperature, seed=args.seed,
                       backend=args.backend, model_path=args.model, stride=args.stride)
    m["model"] = str(args.model)
    m["policy"] = policy.fingerprint
    write_metrics(m, args.out)
    print(json.dumps({k: v for k, v in m.items() if not isinstance(v, dict)}, indent=1, default=float))
    return 0
