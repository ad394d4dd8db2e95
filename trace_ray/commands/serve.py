"""``trace-ray serve``: the re-aligned model behind an OpenAI-compatible API, plus online triage.

    trace-ray serve --model runs/v2/adapter --policy configs/policies/pku_harm_v2.yaml
    TRACE_API_KEY=secret trace-ray serve --model runs/v2/model --port 8080 --guard
"""

from __future__ import annotations

import argparse

HELP = "serve a model (OpenAI API) and a policy (/v1/triage) over HTTP with Ray Serve"


def _adapter(value: str) -> tuple[str, str]:
    if "=" not in value:
        raise argparse.ArgumentTypeError(f"--adapter {value!r}: expected NAME=DIR")
    name, folder = value.split("=", 1)
    return name, folder


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help=HELP,
        description=(
            HELP + ". Routes: GET /healthz, GET /v1/models, POST /v1/chat/completions, "
            "POST /v1/completions (stream: true → server-sent events), POST /v1/triage. "
            "When $TRACE_API_KEY is set every route but /healthz needs 'Authorization: Bearer <key>'."
        ),
    )
    p.add_argument("--model", required=True,
                   help="model to serve: an HF folder (OUT/model), a peft adapter folder (OUT/adapter; its base "
                        "is served too), a .gguf file, or pypi:smollm2")
    p.add_argument("--policy", default=None,
                   help="policy YAML for /v1/triage and guard mode (callable rules are refused); without it "
                        "/v1/triage answers 404")
    p.add_argument("--adapter", action="append", type=_adapter, default=[], metavar="NAME=DIR",
                   help="another LoRA adapter to serve as model '<base>:NAME' (repeatable), e.g. one per policy version")
    p.add_argument("--served-name", default=None,
                   help="model id of the base in /v1/models (default: the model folder's name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, loopback only; 0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto",
                   help="generation engine: hf = transformers with @serve.batch (CPU/1 GPU); vllm = ray.serve.llm "
                        "(GPU, needs vllm); auto = vllm when importable and a GPU is visible (default auto)")
    p.add_argument("--guard", action="store_true",
                   help="check every completion against the policy and add 'guard' (verdict, reasons) to each "
                        "choice; a request can still set \"guard\": false/true itself")
    p.add_argument("--judge-model", default=None,
                   help="model that answers the policy's judge rule (default: the rule's own model)")
    p.add_argument("--max-batch-size", type=int, default=None, help="@serve.batch size of the hf backend (default 8)")
    p.add_argument("--replicas", type=int, default=None, help="replicas of the hf generator (default 1)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray is started)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any ServeSettings field, dotted (repeatable): limits.max_text_chars=4000, "
                        "limits.max_items=64, limits.max_tokens=256, limits.max_body_bytes=200000, hf.num_cpus=2, "
                        "vllm.lora_path=s3://bucket/adapters, api_key_env=MY_KEY (see docs/serving.md)")
    p.add_argument("--no-block", action="store_true",
                   help="deploy and return instead of serving until Ctrl-C (the app keeps running in the Ray cluster)")
    p.set_defaults(func=run)


def settings_from_args(args):
    from trace_ray.config import deep_merge, from_dict, parse_overrides

    from serve.settings import ServeSettings

    data: dict = {"model": args.model, "policy": args.policy, "adapters": dict(args.adapter),
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
    import time

    from ray import serve

    from serve.app import build_from_settings
    from trace_ray.policy import PolicyError
    from trace_ray.ray_utils import ensure_ray
    from trace_ray.config import ConfigError

    settings = settings_from_args(args)
    try:
        app = build_from_settings(settings)  # validates model, adapters and policy before Ray starts
    except (PolicyError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None
    ensure_ray(args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="trace-ray", route_prefix="/")
    print(f"trace-ray serve: ready at http://{args.host}:{args.port} (GET /v1/models, POST /v1/chat/completions, "
          f"/v1/completions, /v1/triage; GET /healthz)", flush=True)
    if args.no_block:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
