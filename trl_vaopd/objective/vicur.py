"""ViCuR's sampled-token objective (`docs/methods/vicur.md`, "The objective") as a pure tensor function.

The paper trains with a per-token advantage `A_t = log p_T(y_t | X, S, y_<t) - log p_S(y_t | X, y_<t)` (the teacher
sees the cue `S`) in a policy-gradient loss; with one on-policy update per batch its gradient is
`-A_t * grad log p_S(y_t)`, the sampled-token (k1) estimate of the reverse KL's gradient. The full-vocabulary reverse
KL (`docs/methods/va_opd.md`, "The loss") is its exact expectation and stays the default; this is the paper's
estimator, for runs that reproduce it.
"""

from __future__ import annotations

import torch


__all__ = ["sampled_token_kl"]


def sampled_token_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token sampled estimate of `KL(p_S || p_T)` whose gradient is the paper's policy gradient.

    Its value is `k1_t = log p_S(y_t) - log p_T(y_t)` (an unbiased estimate of the KL at a token sampled from the
    student); its gradient with respect to `student_logp` is `k1_t = -A_t`, so minimising `sum_t c_t * k1_t` steps
    along `sum_t c_t * A_t * grad log p_S(y_t)`, ViCuR's update.

    Args:
        student_logp: `(N, T)` student log-probabilities of the sampled tokens (with gradient).
        teacher_logp: `(N, T)` teacher log-probabilities of the same tokens, under its privileged prompt.
        mask: `(N, T)` valid-token mask.

    Returns:
        `(N, T)` per-token values, zero on invalid positions.
    """
    k1 = (student_logp - teacher_logp).detach()
    value = k1 + k1 * (student_logp - student_logp.detach())
    return torch.where(mask.bool(), value, torch.zeros_like(value))
