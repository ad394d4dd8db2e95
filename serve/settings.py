"""Typed settings of the Serve application (``trace_ray.config`` dataclasses, strict).

The same tree is built from ``trace-ray serve`` options, from ``serve run serve.app:build_app
key=value`` arguments and from the ``args:`` of a Serve config file, so the three entry points
validate identically and fail before anything is deployed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trace_ray.config import ConfigError


@dataclass
class Limits:
    """Request size limits; anything over them is a 413/422 with a message, never work."""

    max_body_bytes: int = 1_000_000  # raw HTTP body
    max_text_chars: int = 16_000  # one prompt, response, message content or stop string
    max_messages: int = 64  # chat messages per request
    max_items: int = 256  # triage items per request (judged as one batch)
    max_tokens: int = 512  # upper bound on a request's max_tokens
    default_max_tokens: int = 64  # used when a request gives none
    max_n: int = 4  # choices per completion request
    max_stop: int = 4  # stop strings per request
    max_json_depth: int = 32  # nesting of the JSON body (arrays/objects); deeper is a 400
    body_timeout_s: float = 30.0  # time to receive the whole body; a slower client gets a 408

    def validate(self) -> None:
        for name in ("max_body_bytes", "max_text_chars", "max_messages", "max_items", "max_tokens", "max_n", "max_stop",
                     "max_json_depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"limits.{name}: must be >= 1, got {getattr(self, name)}")
        if self.body_timeout_s <= 0:
            raise ConfigError(f"limits.body_timeout_s: must be > 0, got {self.body_timeout_s}")
        if not 1 <= self.default_max_tokens <= self.max_tokens:
            raise ConfigError(
                f"limits.default_max_tokens: must be in [1, max_tokens={self.max_tokens}], got {self.default_max_tokens}"
            )


@dataclass
class HFOptions:
    """The CPU (or single-GPU) transformers deployment."""

    max_batch_size: int = 8  # @serve.batch size
    batch_wait_timeout_s: float = 0.01  # @serve.batch wait for a fuller batch
    num_replicas: int = 1
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica; > 0 puts the model on cuda
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def validate(self) -> None:
        if self.max_batch_size < 1 or self.num_replicas < 1:
            raise ConfigError("hf.max_batch_size and hf.num_replicas must be >= 1")
        if self.batch_wait_timeout_s < 0 or self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("hf.batch_wait_timeout_s, hf.num_cpus and hf.num_gpus must be >= 0")


@dataclass
class VLLMOptions:
    """The GPU path through ``ray.serve.llm`` (vLLM engines; LoRA adapters per policy version)."""

    # Folder in object storage (s3://, gs://, abfss://, azure://) holding one sub-folder per
    # adapter; ray.serve.llm loads them on demand as "<served_name>:<adapter>".
    lora_path: str | None = None
    max_num_adapters_per_replica: int = 8
    accelerator_type: str | None = None  # e.g. "H100"; None: any GPU
    min_replicas: int = 1
    max_replicas: int = 1
    engine_kwargs: dict = field(default_factory=dict)  # passed to vLLM (max_model_len, tensor_parallel_size ...)


@dataclass
class ServeSettings:
    """Everything ``build_app`` needs; see docs/serving.md."""

    model: str  # HF folder, hub id (org/name), x.gguf, pypi:smollm2, or a peft adapter folder (+ its base)
    # Policies for /v1/triage and guard mode: "[NAME=]FILE.yaml" or a folder of YAMLs, one or a list
    # (or a mapping name -> file); the first is the default. None disables both (serve/state.py).
    policy: str | list[str] | dict[str, str] | None = None
    # More LoRA adapters: name -> folder, or a list of "[NAME=]DIR" (DIR: an adapter, or a folder of them)
    adapters: dict[str, str] | list[str] = field(default_factory=dict)
    served_name: str | None = None  # model id of the base in /v1/models (default: folder name)
    backend: Literal["auto", "hf", "vllm"] = "auto"  # auto: vllm when importable and a GPU is visible
    guard: bool = False  # check every completion against the policy (a request may also ask)
    judge_model: str | None = None  # model that answers `judge` rules (default: the served base)
    api_key_env: str = "TRACE_API_KEY"  # env var holding the bearer token (read at build time)
    gateway_num_cpus: float = 0.25  # logical CPUs reserved by the HTTP ingress replica (async, light)
    triage_num_cpus: float = 0.1  # logical CPUs reserved by the triage replica (rules are cheap)
    limits: Limits = field(default_factory=Limits)
    hf: HFOptions = field(default_factory=HFOptions)
    vllm: VLLMOptions = field(default_factory=VLLMOptions)

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model: must name a model folder or spec")
        for name in self.adapters if isinstance(self.adapters, dict) else ():
            if not name or ":" in name or "/" in name:
                raise ConfigError(f"adapters.{name}: adapter names must be non-empty, without ':' or '/'")
        if self.gateway_num_cpus < 0 or self.triage_num_cpus < 0:
            raise ConfigError("gateway_num_cpus and triage_num_cpus must be >= 0")
        if self.guard and not self.policy:
            raise ConfigError("guard: needs a policy")
