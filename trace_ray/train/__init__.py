"""Stage 3 training (issue 4): ``realign(config)`` on Ray Train (DDP or DeepSpeed) and
``train_local(config)`` (the same step/loop code in-process, one worker).

``RunConfig`` (``trace_ray.train.config``) is the one typed config; see docs/training.md.
"""

from trace_ray.train.config import RunConfig, load_run_config


def realign(config, **kwargs) -> dict:
    """See ``trace_ray.train.run.realign``."""
    from trace_ray.train.run import realign as _realign

    return _realign(config, **kwargs)


def train_local(config, **kwargs) -> dict:
    """See ``trace_ray.train.local.train_local``."""
    from trace_ray.train.local import train_local as _train_local

    return _train_local(config, **kwargs)


__all__ = ["RunConfig", "load_run_config", "realign", "train_local"]
