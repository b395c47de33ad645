"""The evaluate stage's PNG plots: drawing to files, and the training loss curve. Each
metric draws its own plots (its `Metric.plots`) with these."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib's pyplot, drawing to files only: workers and CI have no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return str(path)


def loss_curve_plot(curve: list[dict], out_dir: Path) -> list[str]:
    """The training loss against the step; none without a curve."""
    if not curve:
        return []
    fig, ax = pyplot().subplots(figsize=(6, 4))
    ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Token Distillation loss")
    return [save(fig, out_dir / "loss_curve.png")]
