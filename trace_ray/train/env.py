"""Where the training loop runs: a Ray Train worker (``RayEnv``) or this process (``LocalEnv``).

The loop (``loop.run_worker``) only talks to an env: rank/world, collective sums, reporting
metrics with an optional checkpoint folder, the checkpoint to resume from, a progress bar.
So the Ray Train path and ``train_local`` share every line of the step and loop code.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

import torch


class LocalEnv:
    """One in-process worker; checkpoints go to ``OUT/checkpoints/step_XXXXXX`` (newest ``keep``)."""

    rank = 0
    world = 1
    device = torch.device("cpu")

    def __init__(self, out_dir: str | Path, keep: int = 2, progress: bool = True):
        self.out = Path(out_dir)
        self.keep = keep
        self.progress = progress
        self.final_dir: Path | None = None

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass

    @contextlib.contextmanager
    def latest_checkpoint(self):
        root = self.out / "checkpoints"
        found = sorted(root.glob("step_*")) if root.exists() else []
        found = [d for d in found if (d / "trainer_state.json").exists()]
        yield found[-1] if found else None

    def report(self, metrics: dict, ckpt_dir: Path | None = None, final: bool = False) -> None:
        if ckpt_dir is None:
            return
        root = self.out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        dest = root / f"step_{int(metrics['step']):06d}{'_final' if final else ''}"
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(ckpt_dir, dest)
        if final:
            self.final_dir = dest
        for old in sorted(root.glob("step_*"))[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def tqdm(self, **kw):
        from tqdm.auto import tqdm

        return tqdm(disable=not self.progress, **kw)


class RayEnv:
    """A Ray Train worker: torch.distributed (gloo/nccl) set up by ``TorchTrainer``."""

    def __init__(self, progress: bool = True):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.progress = progress

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place; CPU tensors travel through the device when the backend is nccl."""
        import torch.distributed as dist

        if self.world > 1:
            x = t if t.device == self.device else t.to(self.device)
            dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
            if x is not t:
                t.copy_(x.to(t.device))
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.world > 1:
            x = t if t.device == self.device else t.to(self.device)
            dist.broadcast(x, src=0)
            if x is not t:
                t.copy_(x.to(t.device))
        return t

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.world > 1:
            dist.barrier()

    @contextlib.contextmanager
    def latest_checkpoint(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict, ckpt_dir: Path | None = None, final: bool = False) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
        ray.train.report(dict(metrics, final=int(final)), checkpoint=checkpoint)

    def tqdm(self, **kw):
        from ray.experimental.tqdm_ray import tqdm

        kw.pop("dynamic_ncols", None)
        initial = kw.pop("initial", 0)  # tqdm_ray takes neither
        if not (self.progress and self.rank == 0):
            return _NoBar()
        bar = tqdm(**kw)
        if initial:
            bar.update(initial)
        if not hasattr(bar, "write"):
            bar.write = lambda s: print(s, flush=True)
        return bar


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass

    def write(self, s):
        print(s, flush=True)


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="trace_ckpt_"))


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, default=float))
