"""Diagnostics of visual reliance: per-token visual advantage (VA) of any model, heatmaps, VA concentration, and a
training callback that tracks the student's own visual reliance.

The per-token VA (`docs/methods/va_opd.md`, "Visual advantage") is defined with the teacher as scorer, but the same
quantity measures any model's reliance on fine visual detail: score a response under the original image and under a
counterfactual view (the image without its fine detail, or no image) and keep the positive log-probability gap of
every token. This package measures and draws it the ways the paper does, one module per idea:

- [`score_visual_advantage`] / [`score_many`]: per-token VA of (image, prompt, response) triples under any model;
- [`va_heatmap_html`] / [`va_heatmap_png`]: one response under several models side by side (the paper's Figure 6);
- [`va_concentration_curve`] / [`va_concentration`] / [`plot_va_concentration`]: the share of the VA mass held by
  the top tokens (the paper: about 93% in the top 10%);
- [`VisualRelianceCallback`]: during training, the student's own visual reliance on fresh rollouts and the teacher's
  VA on them, optionally with accuracy, and their trajectory (the paper's Figure 4b).
"""

from .concentration import plot_va_concentration, va_concentration, va_concentration_curve
from .heatmaps import va_heatmap_html, va_heatmap_png
from .reliance import (
    ACCURACY_KEY,
    RESPONSE_LENGTH_KEY,
    STUDENT_RELIANCE_KEY,
    TEACHER_VA_KEY,
    VisualRelianceCallback,
    plot_reliance_trajectory,
)
from .scoring import TokenVA, score_many, score_visual_advantage


__all__ = [
    "ACCURACY_KEY",
    "RESPONSE_LENGTH_KEY",
    "STUDENT_RELIANCE_KEY",
    "TEACHER_VA_KEY",
    "TokenVA",
    "VisualRelianceCallback",
    "plot_reliance_trajectory",
    "plot_va_concentration",
    "score_many",
    "score_visual_advantage",
    "va_concentration",
    "va_concentration_curve",
    "va_heatmap_html",
    "va_heatmap_png",
]
