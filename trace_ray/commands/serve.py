"""``trace-ray serve``: the re-aligned model behind an OpenAI-compatible API, plus online triage.

    trace-ray serve --model runs/v2/adapter --policy configs/policies/pku_harm_v2.yaml
    trace-ray serve --model base/ --adapter runs/ --policy v2=pku_harm_v2.yaml --policy v3=pku_harm_v3.yaml
    TRACE_API_KEY=secret trace-ray serve --model runs/v2/model --port 8080 --guard

The long-running part (reload, graceful shutdown) is ``serve/runner.py``.
"""

from __future__ import annotations

import argparse

HELP = "serve a model (OpenAI API) and policies (/v1/triage) over HTTP with Ray Serve"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help=HELP,
        description=(
            HELP + ". Routes: GET /healthz, GET /v1/models, GET /v1/policies, POST /v1/chat/completions, "
            "POST /v1/completions (stream: true → server-sent events), POST /v1/triage. "
            "When $TRACE_API_KEY is set every route but /healthz needs 'Authorization: Bearer <key>'. "
            "New adapter folders and changed or new policy files are picked up while it runs (--reload-interval); "
            "SIGTERM / Ctrl-C stop it gracefully (--grace-period)."
        ),
    )
    p.add_argument("--model", required=True,
                   help="model to serve: an HF folder (OUT/model), a peft adapter folder (OUT/adapter; its base "
                        "is served too), a .gguf file, or pypi:smollm2")
    p.add_argument("--policy", action="append", default=[], metavar="[NAME=]PATH",
                   help="a policy for /v1/triage and guard mode (repeatable): NAME=FILE.yaml, FILE.yaml (named by "
                        "its file stem) or a folder of policy YAMLs (each named by its stem); the first is the "
                        "default of /v1/triage. Callable rules are refused. Without any, /v1/triage answers 404")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="a LoRA adapter to serve as model '<base>:NAME' (repeatable): NAME=DIR, DIR (named as "
                        "trace-ray realign names it: runs/v3/adapter -> v3), or a folder whose sub-folders are "
                        "adapters (each named by its sub-folder; new ones are picked up)")
    p.add_argument("--served-name", default=None,
                   help="model id of the base in /v1/models (default: the model folder's name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, loopback only; 0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto",
                   help="generation engine: hf = transformers with @serve.batch (CPU/1 GPU); vllm = ray.serve.llm "
                        "(GPU, needs vllm); auto = vllm when importable and a GPU is visible (default auto)")
    p.add_argument("--guard", action="store_true",
                   help="check every completion against the policy its model was re-aligned for (read from the "
                        "adapter's run_config.yaml; else the first policy) and add 'guard' (verdict, reasons, "
                        "policy) to each choice; a request can still set \"guard\": false/true itself")
    p.add_argument("--judge-model", default=None,
                   help="model that answers the policies' judge rules (default: the first judge rule's model)")
    p.add_argument("--max-batch-size", type=int, default=None, help="@serve.batch size of the hf backend (default 8)")
    p.add_argument("--replicas", type=int, default=None, help="replicas of the hf generator (default 1)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray is started)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any ServeSettings field, dotted (repeatable): limits.max_text_chars=4000, "
                        "limits.max_items=64, limits.max_tokens=256, limits.max_body_bytes=200000, "
                        "limits.body_timeout_s=10, hf.num_cpus=2, vllm.lora_path=s3://bucket/adapters, "
                        "api_key_env=MY_KEY (see docs/serving.md)")
    p.add_argument("--reload-interval", type=float, default=5.0, metavar="SECONDS",
                   help="how often policy files and adapter folders are checked for changes; a change is applied "
                        "in place (Serve reconfigure, requests in flight finish); 0 turns it off (default 5)")
    p.add_argument("--grace-period", type=float, default=20.0, metavar="SECONDS",
                   help="on SIGTERM or SIGINT: new requests get 503, requests in flight get this long to finish, "
                        "then Serve and the local Ray stop and the process exits 0 (default 20)")
    p.add_argument("--no-block", action="store_true",
                   help="deploy and return instead of serving until stopped (the app keeps running in the Ray "
                        "cluster; no reload, no graceful shutdown)")
    p.set_defaults(func=run)


def settings_from_args(args):
    from trace_ray.config import deep_merge, from_dict, parse_overrides

    from serve.settings import ServeSettings

    data: dict = {"model": args.model, "policy": list(args.policy) or None, "adapters": list(args.adapter),
                  "served_name": args.served_name, "backend": args.backend, "guard": args.guard,
                  "judge_model": args.judge_model}
    hf: dict = {}
    if args.max_batch_size is not None:
        hf["max_batch_size"] = args.max_batch_size
    if args.replicas is not None:
        hf["num_replicas"] = args.replicas
    if hf:
        data["hf"] = hf
    data = deep_merge(data, parse_overrides(args.overrides))
    return from_dict(ServeSettings, data)


def run(args) -> int:
    from serve.runner import serve_forever
    from trace_ray.config import ConfigError
    from trace_ray.policy import PolicyError

    if args.reload_interval < 0 or args.grace_period < 0:
        raise ConfigError("--reload-interval and --grace-period must be >= 0")
    settings = settings_from_args(args)
    try:
        return serve_forever(settings, host=args.host, port=args.port, address=args.address,
                             reload_s=args.reload_interval, grace_s=args.grace_period, block=not args.no_block)
    except (PolicyError, ValueError) as e:  # before anything started: the CLI reports it and exits 2
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None
