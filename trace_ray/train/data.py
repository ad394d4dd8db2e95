"""The training dataset: triaged Parquet → rows with a loss → (y_c) → (reference log-probs).

``prepare_dataset`` (Ray Data, streaming, order preserved) and ``prepare_records`` (plain
pyarrow, in-process, for ``train_local``) apply the same filters and the same UDF classes.
``split_shards`` cuts the rows into contiguous, balanced slices ``train_{i}`` (sizes differ by at
most one) on the driver, before the workers start (block slicing runs Ray tasks, which would wait
forever once the workers hold every CPU); worker i reads ``train_{i}``. A deterministic split, so
a resumed run and a run on another number of workers see the same rows in the same order (Ray's
default ``streaming_split`` assigns blocks dynamically). The ``gold`` dataset goes to every worker
whole. The trainer passes them all unsplit (``DataConfig(datasets_to_split=[])``).
"""

from __future__ import annotations

from pathlib import Path

from trace_ray.train.config import RunConfig, used_categories


def _keep(cats):
    cats = set(cats)
    return lambda batch: batch[batch["category"].isin(cats)]


def prepare_dataset(cfg: RunConfig, out: Path):
    """A materialised Ray Dataset of the rows to train on, with the extra columns."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    from trace_ray.triage_output import triaged_path

    ds = ray.data.read_parquet(triaged_path(cfg.data.triaged))
    if cfg.data.limit:
        ds = ds.limit(cfg.data.limit)
    ds = ds.map_batches(_keep(used_categories(cfg)), batch_format="pandas")
    wrote = False
    if cfg.corrected.enabled:
        from trace_ray.train.corrected import CorrectedResponses

        ds = ds.map_batches(
            CorrectedResponses, fn_constructor_kwargs=corrected_kwargs(cfg), batch_size=cfg.corrected.batch_size,
            batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=cfg.corrected.workers),
        )
        wrote = True
    if cfg.reference.mode == "precomputed":
        from trace_ray.train.passes import ReferenceLogps

        ds = ds.map_batches(
            ReferenceLogps, fn_constructor_kwargs=reference_kwargs(cfg), batch_size=cfg.reference.batch_size,
            batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=cfg.reference.workers),
        )
        wrote = True
    ds = ds.materialize()
    if wrote:
        dest = out / "prepared"
        if dest.exists():
            import shutil

            shutil.rmtree(dest)
        ds.write_parquet(str(dest))
    return ds


def prepare_records(cfg: RunConfig) -> list[dict]:
    """The same rows as ``prepare_dataset``, built in this process (no Ray)."""
    from trace_ray.triage_output import read_triaged

    df = read_triaged(cfg.data.triaged).to_pandas()
    if cfg.data.limit:
        df = df.iloc[: cfg.data.limit]
    df = _keep(used_categories(cfg))(df).reset_index(drop=True)
    if cfg.corrected.enabled:
        from trace_ray.train.corrected import CorrectedResponses

        df = _batched(CorrectedResponses(**corrected_kwargs(cfg)), df, cfg.corrected.batch_size)
    if cfg.reference.mode == "precomputed":
        from trace_ray.train.passes import ReferenceLogps

        df = _batched(ReferenceLogps(**reference_kwargs(cfg)), df, cfg.reference.batch_size)
    return df.to_dict("records")


def _batched(fn, df, bs: int):
    import pandas as pd

    parts = [fn(df.iloc[s : s + bs].reset_index(drop=True)) for s in range(0, len(df), bs)]
    return pd.concat(parts, ignore_index=True) if parts else df


def reference_kwargs(cfg: RunConfig) -> dict:
    return dict(model_spec=cfg.model.name, dtype=cfg.model.dtype,
                attn_implementation=cfg.model.attn_implementation, max_length=cfg.data.max_length)


def corrected_kwargs(cfg: RunConfig) -> dict:
    c = cfg.corrected
    return dict(model_spec=c.model or cfg.model.name, policy_path=c.policy, system_prompt=c.system_prompt,
                max_new_tokens=c.max_new_tokens, temperature=c.temperature, seed=cfg.train.seed)


def balanced_bounds(n: int, world: int) -> list[int]:
    """Cut points of ``world`` contiguous slices of ``n`` rows, sizes differing by at most one."""
    base, extra = divmod(n, world)
    cuts, at = [], 0
    for i in range(world - 1):
        at += base + (1 if i < extra else 0)
        cuts.append(at)
    return cuts


def split_shards(ds, world: int) -> dict:
    """``{"train_0": ds_0, ...}``: contiguous balanced slices, materialised."""
    if world == 1:
        return {"train_0": ds}
    parts = ds.split_at_indices(balanced_bounds(ds.count(), world))
    return {f"train_{i}": p.materialize() for i, p in enumerate(parts)}
