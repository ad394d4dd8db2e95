"""Model, LoRA, reference, optimiser, schedule and DeepSpeed config from a ``RunConfig``."""

from __future__ import annotations

import math
import random

import torch

from trace_ray.train.config import RunConfig, needs_frozen_copy


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass


def build_model(cfg: RunConfig, device: torch.device | str = "cpu"):
    """``(tokenizer, model, ref_model or None)``: the trainable model (LoRA-wrapped when enabled,
    seeded so every worker builds the same initial adapter) in train mode on ``device``."""
    from trace_ray.models.load import load_model, load_tokenizer

    tok = load_tokenizer(cfg.model.name)
    base = load_model(cfg.model.name, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation)
    ref = None
    if needs_frozen_copy(cfg):
        ref = load_model(cfg.model.name, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation)
        ref.requires_grad_(False).eval().to(device)
    if cfg.model.gradient_checkpointing:
        base.gradient_checkpointing_enable()
        base.config.use_cache = False
    if cfg.model.lora.enabled:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(cfg.train.seed)
        lcfg = LoraConfig(
            r=cfg.model.lora.r, lora_alpha=cfg.model.lora.alpha, lora_dropout=cfg.model.lora.dropout,
            target_modules=list(cfg.model.lora.target_modules), task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, lcfg)
    else:
        model = base
        model.requires_grad_(True)
    model.to(device)
    model.train()
    return tok, model, ref


def trainable_named(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(params, cfg: RunConfig, total_steps: int):
    """A client torch optimiser (no DeepSpeed ``cpu_adam`` compile) and a LambdaLR schedule."""
    o = cfg.optim
    if o.name == "adamw":
        opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay)
    warm, total = o.warmup_steps, max(1, total_steps)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if o.schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return 1.0 - frac if o.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return opt, sched


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config: batch sizes from ``train``, ZeRO stage from ``backend.zero_stage``,
    precision from ``train.mixed_precision`` (bf16: DeepSpeed casts the module to bf16 and keeps
    fp32 master weights in its optimiser) or ``model.dtype=float16`` (its fp16 mode, loss scaling),
    clipping from ``optim``; ``backend.deepspeed`` merged on top."""
    from trace_ray.config import deep_merge

    zero: dict = {"stage": cfg.backend.zero_stage}
    if cfg.backend.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world_size,
        "zero_optimization": zero,
        "gradient_clipping": cfg.optim.max_grad_norm or 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.train.mixed_precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.model.dtype == "float16":
        ds["fp16"] = {"enabled": True}
    return deep_merge(ds, cfg.backend.deepspeed)
