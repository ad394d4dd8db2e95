"""Subcommands of ``trace-ray``; see ``trace_ray.cli``."""
