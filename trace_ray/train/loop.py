"""The training loop: ``train_loop_per_worker(config)`` for Ray Train, and ``run_worker`` shared
with ``train_local``.

``train_loop_per_worker`` reads only its ``config`` (``{"run": RunConfig as a dict, "plan": ...}``)
and its dataset shards (``train_{rank}``: this worker's rows, split on the driver; ``gold``: the gold batch, unsplit). The
``plan`` is computed by the driver: ``steps_per_epoch`` (the same on every worker; a worker whose
shard runs out first feeds zero-loss padding rows so collectives stay in step), ``total_steps``.

Per optimizer step: ``grad_accum`` micro-steps of ``train.batch_size`` mixed rows each
(``step.compute_loss``), backward of ``loss / grad_accum``; then

- ``ddp``: the trainable gradients are all-reduced (mean) in one flat bucket — what
  ``DistributedDataParallel`` does, done by hand because the log-prob forward calls the backbone
  and the LM head separately (label log-probs without full logits), which DDP's wrapped
  ``forward`` would not see; then clipping, the optimiser and the schedule;
- ``deepspeed``: ``engine.backward`` / ``engine.step`` (ZeRO 0–3, a client torch optimiser).

Every ``log_every`` steps: summed statistics are all-reduced, rank 0 appends a line to
``OUT/metrics.jsonl`` and the console, and every worker calls ``ray.train.report`` (with a
checkpoint every ``checkpoint_every`` steps, and at the end with the final model).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from trace_ray.config import from_dict
from trace_ray.train import save as S
from trace_ray.train.build import build_model, build_optimizer, deepspeed_config, seed_everything, trainable_named
from trace_ray.train.config import RunConfig
from trace_ray.train.env import scratch_dir
from trace_ray.train.step import DUMMY_ROW, PREF_CATEGORIES, StepSettings, autocast_context, collate, compute_loss, merge_stats, stats_tensor, summarize, tensor_stats


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (runs on every worker)."""
    import ray.train

    from trace_ray.train.env import RayEnv

    cfg = from_dict(RunConfig, config["run"])
    _quiet_ray_logs()
    env = RayEnv(progress=cfg.logging.progress)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the step bar is the one to watch
    plan = config["plan"]
    shards = {v: list(ray.train.get_dataset_shard(f"train_{v}").iter_rows())
              for v in virtual_ranks(env.rank, env.world, plan["world"])}
    gold_it = ray.train.get_dataset_shard("gold") if plan.get("gold") else None
    gold = list(gold_it.iter_rows()) if gold_it is not None else []
    run_worker(cfg, plan, shards, gold, env)
    if cfg.backend.kind == "deepspeed":
        import torch.distributed as dist

        if dist.is_initialized():  # else rank 1 sometimes aborts at exit (DESIGN §6)
            dist.barrier()
            dist.destroy_process_group()


def _micro_rows(rows: list[dict], k: int, B: int, mpe: int, seed: int, shuffle: bool, pad_row: dict) -> list[dict]:
    """Rows of global micro-step ``k``: epoch ``k // mpe``, a seeded permutation per epoch."""
    epoch, pos = divmod(k, mpe)
    n = len(rows)
    if shuffle and n:
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    take = [rows[i] for i in order[pos * B : (pos + 1) * B]]
    return take or [pad_row]


def _clean_rows(rows: list[dict], offset: int = 0) -> list[dict]:
    """Plain Python values, and ``_row``: the row's position in the training rows (shard offset +
    index), which keys its impact weight — ids need not be unique."""
    out = []
    for i, r in enumerate(rows):
        r = dict(r, _row=offset + i)
        for k, v in list(r.items()):
            if hasattr(v, "item") and not isinstance(v, (str, bytes)):
                r[k] = v.item()
        # pandas turns a missing y_c into NaN (truthy): only a non-empty string is a correction
        if "corrected" in r and not (isinstance(r["corrected"], str) and r["corrected"]):
            r["corrected"] = None
        out.append(r)
    return out


def _quiet_ray_logs() -> None:
    """The console belongs to our metrics lines and progress bar: drop the INFO lines that this
    worker's Ray Train ("Reporting training result ...", each report) and Ray Data (each shard
    read) would print beside them. Warnings and errors still show."""
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:  # Ray Train's reporting context names its logger by file path (Ray 2.60, internal)
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def virtual_ranks(rank: int, world: int, nominal: int) -> list[int]:
    """The shards a worker runs: its own rank's, plus those of missing ranks when the run goes on
    with fewer workers than it started with (``backend.min_workers``): rank r of w runs r, r+w, …"""
    return list(range(rank, nominal, world))


def run_worker(cfg: RunConfig, plan: dict, shards: dict[int, list[dict]], gold: list[dict], env) -> dict:
    """Train on this worker's ``shards`` (``{shard index: rows}``); returns ``{"model", "tokenizer",
    "metrics", "outputs", "weights"}``.

    The run's arithmetic is that of ``plan["world"]`` workers (the shards the driver cut) whatever
    the number of workers running it: each micro-step runs one micro-batch per shard held, and the
    gradients are summed over workers and divided by the number of shards. So a run that lost a
    worker and goes on with fewer ends where the uninterrupted run ends.
    """
    seed_everything(cfg.train.seed)
    offsets = plan.get("offsets", [0])
    shards = {v: _clean_rows(rows, offsets[v]) for v, rows in sorted(shards.items())}
    rows = [r for v in shards for r in shards[v]]
    tok, model, ref_model = build_model(cfg, env.device)
    settings = StepSettings.from_run(cfg)
    B, accum = cfg.train.batch_size, cfg.train.grad_accum
    spe, total_steps = int(plan["steps_per_epoch"]), int(plan["total_steps"])
    nominal = int(plan.get("world", env.world))
    mpe = spe * accum
    named = trainable_named(model)
    params = [p for _, p in named]
    opt, sched = build_optimizer(params, cfg, total_steps)
    ds = cfg.backend.kind == "deepspeed"
    if ds and len(shards) != 1:
        raise RuntimeError("deepspeed: one shard per worker (backend.min_workers is for ddp only)")
    engine = None

    # Stage 3 weights at θ_ref, before any update (a resumed run takes them from its checkpoint).
    with env.latest_checkpoint() as ckpt:
        has_ckpt = ckpt is not None
        weights = S.load_weights(ckpt) if has_ckpt else None
    if weights is None:
        weights = _weights(cfg, model, tok, rows, gold, env, ref_model, at_reference=True)
    _attach(rows, weights)
    weights = {r["_row"]: weights[r["_row"]] for r in rows if r["_row"] in weights}  # this worker's share

    if env.world > 1 and not ds:
        for p in model.parameters():  # same start on every rank, as DDP does
            env.broadcast(p.data)
    if ds:
        import deepspeed

        engine, opt, _, sched = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, model_parameters=params,
            config=deepspeed_config(cfg, env.world),
        )
    state = {"step": 0, "metrics": [], "resumed_from": []}
    if has_ckpt:
        with env.latest_checkpoint() as ckpt:
            state = S.load_checkpoint(ckpt, rank=env.rank, model=model, optimizer=opt, scheduler=sched, engine=engine)
        state["resumed_from"] = list(state.get("resumed_from", [])) + [state["step"]]
    metrics: list[dict] = list(state.get("metrics", []))
    out_dir = Path(plan["out_dir"]) if plan.get("out_dir") else None
    log = _MetricsLog(out_dir, metrics, cfg, env)

    # A shard that runs out (or that has no rows at all: fewer rows than workers) feeds padding
    # rows: no loss, but the same forwards and collectives as the others.
    pads = {v: dict(r[0] if r else dict(DUMMY_ROW, category="retain"), _pad=True) for v, r in shards.items()}
    net = engine.module if engine is not None else model
    net.train()
    bar = env.tqdm(total=total_steps, initial=state["step"], desc="realign", unit="step", dynamic_ncols=True)
    acc_stats: dict = {}
    t0, rows_seen = time.perf_counter(), 0.0
    fail_at = plan.get("fail_at_step")
    for step in range(state["step"], total_steps):
        if cfg.impact.weights == "impact" and cfg.impact.refresh_every and step and step % cfg.impact.refresh_every == 0:
            weights = _weights(cfg, net, tok, rows, gold, env, ref_model)
            _attach(rows, weights)
            net.train()
        step_stats: dict = {}
        for micro in range(accum):
            k = step * accum + micro
            for v, shard in shards.items():
                batch = collate(tok, _micro_rows(shard, k, B, mpe, cfg.train.seed, cfg.train.shuffle, pads[v]), settings)
                with autocast_context(cfg, env.device, deepspeed=engine is not None):
                    loss, st = compute_loss(net, batch, settings, ref_model)
                if loss.grad_fn is None:  # padding-only micro-batch: keep every rank's backward in step
                    loss = sum(p.sum() for p in params) * 0.0
                merge_stats(step_stats, st)
                if engine is not None:
                    engine.backward(loss)
                    engine.step()
                else:
                    (loss / accum).backward()
        if engine is not None:
            gnorm = engine.get_global_grad_norm()
            gnorm = float(gnorm) if gnorm is not None else float("nan")
        else:
            _all_reduce_grads(params, env, nominal)
            gnorm = (
                float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm))
                if cfg.optim.max_grad_norm
                else float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
            )
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        merge_stats(acc_stats, step_stats)
        acc_stats["grad_norm_sum"] = acc_stats.get("grad_norm_sum", 0.0) + gnorm
        acc_stats["n_steps"] = acc_stats.get("n_steps", 0.0) + 1
        done = step + 1
        bar.update(1)
        is_last = done == total_steps
        if done % cfg.train.log_every == 0 or is_last:
            line = _reduce_metrics(acc_stats, env, B * accum * nominal)
            rows_seen += line["rows"]
            dt = time.perf_counter() - t0
            line.update(step=done, epoch=(done - 1) // spe, lr=sched.get_last_lr()[0] if hasattr(sched, "get_last_lr") else cfg.optim.lr,
                        samples_per_s=line["rows"] / dt if dt > 0 else None, elapsed_s=dt)
            t0 = time.perf_counter()
            acc_stats = {}
            log.add(line, bar)
            ckpt_now = cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0 and not is_last
            d = None
            if ckpt_now:
                d = scratch_dir()
                S.save_checkpoint(d, rank=env.rank, state=_state(done, log, state), weights=weights,
                                  model=net, optimizer=opt, scheduler=sched, engine=engine)
            env.report(line, d)
            if fail_at and done >= fail_at and d is not None:
                raise RuntimeError(f"injected failure after the checkpoint of step {done} (plan.fail_at_step)")
    bar.close()

    # Final save: a checkpoint that also holds the output folder (the driver copies it to OUT).
    d = scratch_dir()
    sd = S.consolidated_state_dict(engine)
    S.save_checkpoint(d, rank=env.rank, state=_state(total_steps, log, state), weights=weights,
                      model=net, optimizer=opt, scheduler=sched, engine=engine)
    outputs = {}
    if env.rank == 0:
        outputs = S.save_final(d, net, tok, lora=cfg.model.lora.enabled, merge=cfg.output.merge_adapter,
                               save_tokenizer=cfg.output.save_tokenizer, state_dict=sd)
        (d / "metrics.jsonl").write_text("".join(json.dumps(m, default=float) + "\n" for m in log.lines))
    last = dict(log.lines[-1]) if log.lines else {"step": total_steps}
    env.report(dict(last, step=total_steps), d, final=True)
    log.close()
    return {"model": net, "tokenizer": tok, "metrics": log.lines, "outputs": outputs, "weights": weights,
            "resumed_from": state["resumed_from"]}


def _state(step: int, log, state: dict) -> dict:
    return {"step": step, "metrics": log.lines, "resumed_from": state["resumed_from"]}


def _all_reduce_grads(params, env, nominal: int) -> None:
    """Mean of the trainable gradients over the ``nominal`` shards, in one flat bucket (what DDP
    does; with fewer workers than shards each worker's gradient already sums its shards)."""
    if env.world <= 1 and nominal <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).float()
    env.all_reduce(flat)
    flat /= nominal
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off : off + n].view_as(p).to(p.dtype)
        off += n


def _reduce_metrics(acc: dict, env, nominal_rows_per_step: int) -> dict:
    t = stats_tensor(acc)
    env.all_reduce(t)
    s = tensor_stats(t)
    wmax = torch.tensor([acc.get("w_max", 0.0)], dtype=torch.float64)
    env.all_reduce(wmax, op="max")
    s["w_max"] = float(wmax)
    n_steps = acc.get("n_steps", 1.0)
    line = summarize(s, nominal_rows_per_step * n_steps)
    line["grad_norm"] = acc.get("grad_norm_sum", 0.0) / n_steps
    return line


def _weights(cfg: RunConfig, model, tok, rows: list[dict], gold: list[dict], env, ref_model=None,
             at_reference: bool = False) -> dict:
    """``{row: (id, weight)}`` for this worker's preference rows (uniform → 1.0); ``at_reference``:
    before the first update (θ = θ_ref)."""
    if cfg.impact.weights == "uniform":
        return {r["_row"]: (r["id"], 1.0) for r in rows if r["category"] in PREF_CATEGORIES}
    from trace_ray.train.passes import impact_pass

    return impact_pass(cfg, getattr(model, "module", model), tok, rows, gold, env, ref_model, at_reference)


def _attach(rows: list[dict], weights: dict) -> None:
    """Every preference row gets its own weight; one without (a checkpoint of other data) is an
    error, never a silent 1.0 (under L1 normalisation that would outweigh all the others)."""
    for r in rows:
        if r["category"] in PREF_CATEGORIES:
            got = weights.get(r["_row"])
            if got is None or got[0] != r["id"]:
                raise ValueError(f"impact weights: none for row {r['_row']} (id {r['id']}); the checkpoint was made "
                                 "with other training rows: delete it to start over")
            r["weight"] = float(got[1])


class _MetricsLog:
    """Rank 0: metrics.jsonl (rewritten from the checkpoint's lines on resume), console, TB, MLflow."""

    KEYS = ("loss", "L_I", "L_II", "L_KL", "L_retain_nll", "margin", "w_mean", "samples_per_s")

    def __init__(self, out_dir: Path | None, lines: list[dict], cfg: RunConfig, env):
        self.lines = lines
        self.rank0 = env.rank == 0
        self.path = None
        self.tb = self.mlflow = None
        if not self.rank0:
            return
        if out_dir is not None:
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                self.path = out_dir / "metrics.jsonl"
                self.path.write_text("".join(json.dumps(m, default=float) + "\n" for m in lines))
            except OSError:  # OUT not reachable from this node: the final checkpoint still has it
                self.path = None
        if cfg.logging.tensorboard and out_dir is not None:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        if cfg.logging.mlflow_tracking_uri:
            from ray.air.integrations.mlflow import setup_mlflow

            self.mlflow = setup_mlflow(
                {"method": cfg.method}, tracking_uri=cfg.logging.mlflow_tracking_uri,
                experiment_name=cfg.logging.mlflow_experiment, create_experiment_if_not_exists=True,
            )

    def add(self, line: dict, bar) -> None:
        self.lines.append(line)
        if not self.rank0:
            return
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(line, default=float) + "\n")
        shown = " ".join(f"{k}={line[k]:.4g}" for k in self.KEYS if isinstance(line.get(k), (int, float)) and not math.isnan(line[k]))
        bar.write(f"step {line['step']}: {shown}")
        nums = {k: v for k, v in line.items() if isinstance(v, (int, float)) and v is not None}
        if self.tb is not None:
            for k, v in nums.items():
                self.tb.add_scalar(f"realign/{k}", v, line["step"])
        if self.mlflow is not None:
            self.mlflow.log_metrics(nums, step=line["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()
