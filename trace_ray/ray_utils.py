"""Connecting to Ray the same way from the CLI, jobs and tests."""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start or join Ray once per process.

    ``address`` (or ``RAY_ADDRESS``) joins an existing cluster, as under ``ray job submit``;
    otherwise a local instance starts. Does nothing when Ray is already initialised (tests share
    one session instance).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local": a new instance even when a `ray start` cluster runs on this machine (joining one
        # is what --address / RAY_ADDRESS are for)
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **kwargs)
    _quiet_data_progress()


def _quiet_data_progress() -> None:
    """Keep Ray Data's own progress bars, drop its per-operator log spam on a terminal."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False
