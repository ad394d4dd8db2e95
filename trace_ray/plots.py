"""Matplotlib helpers shared by the demo report (``trace_ray.report``) and the real-run report
(``trace_ray.report_run``), which both import them from here (report imports report_run, never
the reverse)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def histograms(series: dict[str, list[float]], path: Path, xlabel: str, title: str) -> Path | None:
    """Overlaid histograms, one per labelled series (None when there is nothing to plot)."""
    if not series:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    for label, xs in series.items():
        ax.hist(xs, bins=30, alpha=0.6, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
