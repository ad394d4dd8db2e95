"""trace-ray: TRACE re-alignment of LLMs to a new policy on Ray.

Stages (each writes Parquet that the next reads): triage (``trace_ray.triage``), reference pass
and impact weights (``trace_ray.impact``), training (``trace_ray.train``), evaluation and report.
Heavy dependencies (Ray, vLLM, DeepSpeed) are imported where they are used.
"""

__version__ = "0.1.0"
