"""VA concentration: the share of the VA mass held by the top tokens (the paper: about 93% in the top 10%)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from ..objective import va_mass_share
from .figures import save_figure
from .scoring import TokenVA, VAValues


__all__ = ["plot_va_concentration", "va_concentration", "va_concentration_curve"]


def _pooled_va(values: VAValues) -> torch.Tensor:
    """All VA values as one 1-D float64 tensor (the valid tokens of every response)."""
    if isinstance(values, torch.Tensor):
        return values.detach().double().flatten().cpu()
    if isinstance(values, np.ndarray):
        return torch.from_numpy(values).double().flatten()
    items = list(values)
    if items and isinstance(items[0], TokenVA):
        return torch.cat([item.va.double() for item in items])
    return torch.tensor(items, dtype=torch.float64)


def va_concentration(values: VAValues, fraction: float = 0.1) -> float:
    """Share of the total VA mass held by the top `ceil(fraction * n)` of `n` tokens (paper: ~0.93 at 0.1).

    `values` are the VA values of valid tokens (any shape, pooled), or a list of [`TokenVA`]. `0.0` without VA mass.
    """
    va = _pooled_va(values)
    return va_mass_share(va, torch.ones_like(va, dtype=torch.bool), fraction)


def va_concentration_curve(
    values: VAValues, fractions: Sequence[float] | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The VA concentration curve: for each fraction `x` of tokens, the share of the VA mass held by the top `x`.

    Args:
        values: VA values of valid tokens (pooled), or a list of [`TokenVA`].
        fractions: fractions in `[0, 1]`; 101 evenly spaced by default.

    Returns:
        `(fractions, shares)` as float arrays. The curve starts at `(0, 0)`, ends at `(1, 1)` (unless there is no VA
        mass at all, where every share is 0), and is non-decreasing; a uniform VA gives the diagonal.
    """
    xs = np.linspace(0.0, 1.0, 101) if fractions is None else np.asarray(fractions, dtype=np.float64)
    if xs.ndim != 1 or ((xs < 0) | (xs > 1)).any():
        raise ValueError("fractions must be a 1-D sequence of values in [0, 1].")
    va = _pooled_va(values)
    # The top 0% holds no mass; `va_mass_share` takes fractions in (0, 1] only
    shares = np.array([va_concentration(va, float(x)) if x > 0 else 0.0 for x in xs])
    return xs, shares


def plot_va_concentration(
    values: VAValues | Mapping[str, VAValues],
    path: str | Path,
    *,
    fractions: Sequence[float] | np.ndarray | None = None,
    highlight: float = 0.1,
    title: str = "VA concentration",
) -> Path:
    """Plot VA concentration curves (one per entry of a mapping `name -> values`) against the uniform diagonal.

    The share at `highlight` (default: the top 10% of tokens) is marked and given in the legend. Returns `path`.
    """
    series = dict(values) if isinstance(values, Mapping) else {"VA": values}
    fig = Figure(figsize=(5.2, 4.2), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="uniform VA")
    for index, (name, vals) in enumerate(series.items()):
        colour = colormaps["tab10"](index)
        xs, shares = va_concentration_curve(vals, fractions)
        share = va_concentration(vals, highlight)
        ax.plot(xs, shares, color=colour, linewidth=2, label=f"{name}: top {highlight:.0%} hold {share:.0%}")
        ax.plot([highlight], [share], "o", color=colour, markersize=6)
    ax.axvline(highlight, color="0.8", linewidth=1, zorder=0)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="fraction of tokens (highest VA first)", ylabel="share of VA mass")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)
