"""``trace-ray demo``: the whole pipeline on SynthShift with a tiny model on a local Ray.

    trace-ray demo --out runs/demo            # full: 4 methods × 2 learning rates (picked on validation) × 3 seeds
    trace-ray demo --out runs/quick --quick   # a minute or two: 1 lr, 1 seed, few steps
"""

from __future__ import annotations

HELP = "run the SynthShift benchmark end to end (world, reference, triage, 4 methods, evaluation, report)"


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help=HELP, description=HELP + ". Writes OUT/report/report.html, report.json and PNG plots.")
    p.add_argument("--out", default="runs/demo", help="output folder (world, triage, runs, report); default runs/demo")
    p.add_argument("--quick", action="store_true",
                   help="a much smaller run for tests: smaller reference, one learning rate, one seed, 8 steps")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of naive_dpo,npo_all,trace_uniform,trace (default: all four)")
    p.add_argument("--lrs", default=None, help="comma-separated learning-rate grid, picked per method on validation "
                                               "(default 7e-4,1e-3; quick: 3e-3)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; quick: 0)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 150; quick: 8)")
    p.add_argument("--num-samples", type=int, default=None, help="sampled answers per held-out prompt (default 4)")
    p.add_argument("--parallel", type=int, default=None, help="concurrent training runs as Ray tasks (default 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every method's RunConfig (repeatable), e.g. --set loss.nll_anchor=0")
    p.set_defaults(func=run)


def run(args) -> int:
    from trace_ray.demo import DemoConfig, quick_config, run_demo

    cfg = quick_config(args.out) if args.quick else DemoConfig(out=args.out)
    if args.methods:
        cfg.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.lrs:
        cfg.lrs = [float(x) for x in args.lrs.split(",")]
    if args.seeds:
        cfg.seeds = [int(x) for x in args.seeds.split(",")]
    if args.steps:
        cfg.max_steps = args.steps
    if args.num_samples:
        cfg.num_samples = args.num_samples
    if args.parallel:
        cfg.parallel = args.parallel
    cfg.extra_overrides = list(args.overrides)
    run_demo(cfg)
    return 0
