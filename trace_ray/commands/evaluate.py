"""``trace-ray evaluate``: a model on held-out real data (``--data``) or on SynthShift's test prompts.

    trace-ray evaluate --model runs/r/adapter --data runs/t/heldout.parquet --policy new.yaml --out metrics.json
    trace-ray evaluate --model runs/demo/runs/trace/model --reference runs/demo/reference --out metrics.json
"""

from __future__ import annotations

import argparse

HELP = "evaluate a model against the new policy on held-out data (--data) or on SynthShift's held-out prompts"
EXAMPLES = """examples:
  trace-ray triage --data pairs.jsonl --policy new.yaml --out runs/t --holdout 0.1
  trace-ray evaluate --model runs/r/adapter --data runs/t --policy new.yaml --out runs/eval/metrics.json
  trace-ray evaluate --model runs/demo/runs/trace/model --reference runs/demo/reference --split test

With --data (real data): TPA of the model's own greedy and sampled answers on the held-out conflict
prompts (invert + punish) judged by the policy's oracle; refusal rate and over-refusal (vs the
reference) on held-out prompts whose old answer was compliant (retain); utility NLL and KL to the
reference on held-out retained answers; length-normalised preference accuracy on held-out invert
and retain pairs. The training table (triaged.parquet) is refused: an in-sample number is not a
result (--in-sample gives a labelled diagnostic). Without --data: SynthShift (docs/demo.md)."""


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help=HELP, description=HELP + " (writes metrics.json).\n\n" + EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="model to evaluate: an HF folder, a peft adapter folder (its reference is the base with "
                        "the adapter disabled), a .gguf or pypi:smollm2")
    p.add_argument("--data", default=None,
                   help="held-out triaged pairs: OUT/heldout.parquet of `trace-ray triage --holdout F`, or that OUT "
                        "folder (default: none = SynthShift)")
    p.add_argument("--reference", default=None,
                   help="the reference model folder (KL, over-refusal, collateral); an adapter's reference is its "
                        "own base; default: none (those metrics are skipped)")
    p.add_argument("--policy", default=None,
                   help="policy YAML used as the oracle (with --data: required for TPA and refusals; SynthShift: "
                        "default configs/synthshift/policy.yaml)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="sampled answers per prompt (default: 2 with --data, 4 on SynthShift)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="--data: tokens per generated answer (default 64; SynthShift answers take 48)")
    p.add_argument("--batch-size", type=int, default=8, help="--data: prompts or pairs per batch (default 8)")
    p.add_argument("--max-prompts", type=int, default=64,
                   help="--data: at most this many held-out prompts per set (conflict, retain) are generated "
                        "from (default 64)")
    p.add_argument("--max-length", type=int, default=512,
                   help="--data: prompt + response tokens when scoring (the prompt keeps its last tokens; "
                        "default 512)")
    p.add_argument("--limit", type=int, default=None, help="--data: read only the first N rows (default: all)")
    p.add_argument("--max-scored", type=int, default=None,
                   help="--data: score at most the first N rows of each set (retain, invert, punish) for utility, "
                        "KL, preference accuracy and punish delta (default: all)")
    p.add_argument("--in-sample", action="store_true",
                   help="--data: allow the training table (triaged.parquet); the metrics are labelled in_sample")
    p.add_argument("--split", default="test", choices=["test", "val", "train"],
                   help="SynthShift: which prompts (default test)")
    p.add_argument("--world-seed", type=int, default=0, help="SynthShift world seed (default 0, as the demo)")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"],
                   help="SynthShift generation: transformers (CPU/GPU) or vLLM (GPU)")
    p.add_argument("--stride", type=int, default=1,
                   help="SynthShift: evaluate every k-th prompt only (quick checks; default 1 = all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", default="metrics.json", help="output JSON path (default metrics.json)")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import sys
    from pathlib import Path

    from trace_ray.evaluate import write_metrics

    for p in [args.model] + ([args.reference] if args.reference else []):
        if not p.startswith("pypi:") and not Path(p).exists():
            raise FileNotFoundError(f"model folder {p} does not exist")
    if args.data:
        from trace_ray.evaluate_pairs import evaluate_pairs

        try:
            m = evaluate_pairs(args.model, args.data, None, args.policy, reference=args.reference,
                               in_sample=args.in_sample, limit=args.limit, max_prompts=args.max_prompts,
                               max_scored=args.max_scored,
                               num_samples=args.num_samples or 2, temperature=args.temperature,
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                               max_length=args.max_length, seed=args.seed, show_progress=not args.no_progress)
        except ValueError as e:
            print(f"trace-ray evaluate: {e}", file=sys.stderr)
            return 2
    else:
        m = _synthshift(args)
    write_metrics(m, args.out)
    print(json.dumps({k: v for k, v in m.items() if not isinstance(v, (dict, list))}, indent=1, default=float))
    return 0


def _synthshift(args) -> dict:
    from trace_ray.data.synthshift import POLICY_PATH, WorldConfig, build_world
    from trace_ray.evaluate import REF_KEYS, evaluate_model, load_for_eval, policy_oracle
    from trace_ray.policy import load_policy

    policy = load_policy(args.policy or POLICY_PATH)
    world = build_world(WorldConfig(seed=args.world_seed))
    model, tok = load_for_eval(args.model)
    num_samples = args.num_samples or 4
    ref = ref_summary = None
    if args.reference:
        ref, _ = load_for_eval(args.reference)
        rm = evaluate_model(ref, tok, world, oracle=policy_oracle(policy), split=args.split,
                            num_samples=num_samples, temperature=args.temperature, seed=args.seed,
                            stride=args.stride)
        ref_summary = {k: rm[k] for k in REF_KEYS}
    m = evaluate_model(model, tok, world, oracle=policy_oracle(policy), ref_model=ref, ref_summary=ref_summary,
                       split=args.split, num_samples=num_samples, temperature=args.temperature, seed=args.seed,
                       backend=args.backend, model_path=args.model, stride=args.stride)
    m["model"] = str(args.model)
    m["policy"] = policy.fingerprint
    return m
