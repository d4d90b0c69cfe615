"""Saving matplotlib figures without pyplot, shared by every diagnostic plot."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


__all__ = ["save_figure"]


def save_figure(fig: Figure, path: str | Path) -> Path:
    # Agg canvas on a bare Figure: no pyplot, so no global figure registry to leak and no GUI backend in a trainer
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, facecolor="white")
    return path
