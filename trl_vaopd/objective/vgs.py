"""Visual Gradient Steering (VGS, decomposed on-policy distillation; `docs/methods/vgs.md`) as pure tensor functions.

Four next-token distributions per valid position: the student with the image `p` and without it `pbar` (both with
gradient), the teacher with the image `q` and without it `qbar`. "Without the image" is a counterfactual view. The
loss of a token is `l_t = KL(p || q) + gamma_t * KL(p || q*) + lambda * M_t * KL(pbar || qbar)` with the visual
target `q* = softmax(log pbar + log q - log qbar)` (`pbar` detached there) and the language-prior mask `M_t` set on
the tokens whose visual dependency score `VDS_t = KL(q || qbar)` is above a quantile of the generation batch.

`vgs_token_terms` is the full-vocabulary reference; the trainer computes the same terms token-chunked
(`trl_vaopd.chunked.vgs_divergences`) and combines them with `vgs_token_loss` and `vgs_loss`. Shapes as in
`trl_vaopd.objective.va_opd`: `N` responses, `T` completion positions, `V` vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .va_opd import vaopd_loss


__all__ = [
    "VGSTerms",
    "adaptive_gamma",
    "kl_from_logprobs",
    "lp_mask",
    "valid_quantile",
    "vgs_loss",
    "vgs_token_loss",
    "vgs_token_terms",
    "visual_target_logits",
]


class VGSTerms(NamedTuple):
    """The four per-token quantities of VGS, each `(N, T)` and zero on invalid positions."""

    standard: torch.Tensor
    """`KL(p || q)`, with gradient through `p`."""
    visual: torch.Tensor
    """`KL(p || q*)`, with gradient through `p` (not through `pbar`, detached inside `q*`)."""
    language: torch.Tensor
    """`KL(pbar || qbar)`, with gradient through `pbar`."""
    vds: torch.Tensor
    """Visual dependency score `KL(q || qbar)`, teacher only, detached."""
    target_shift: torch.Tensor
    """`KL(q* || q)`: how far the visual target moved from the teacher's own prediction (a diagnostic, detached).
    Where the teacher's two views agree, `q*` is the student's no-image prediction `pbar`, so a student without a
    meaningful text-only prior drags the target away from the teacher."""
    target_flip: torch.Tensor
    """`1` where the visual target's most likely token differs from the teacher's (a diagnostic), else `0`."""


def kl_from_logprobs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """`KL(p || q) = sum_v p_v (log p_v - log q_v)` over the last dimension, from normalised log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def visual_target_logits(log_pbar: torch.Tensor, log_q: torch.Tensor, log_qbar: torch.Tensor) -> torch.Tensor:
    """Unnormalised logits of the visual target `q* = softmax(log pbar + log q - log qbar)`; `pbar` is detached.

    It keeps the student's language prior and swaps in the teacher's visual likelihood `log q - log qbar`.
    """
    return log_pbar.detach() + log_q - log_qbar


def vgs_token_terms(
    student_logits: torch.Tensor,
    student_cf_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_cf_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> VGSTerms:
    """The four per-token VGS terms from full-vocabulary logits (the reference the chunked path is tested against).

    Computed in the logits' dtype (pass float64 for a reference). The teacher's logits get no gradient.

    Args:
        student_logits: `(N, T, V)` student logits with the image (`p`).
        student_cf_logits: `(N, T, V)` student logits under the counterfactual view (`pbar`), same tokens.
        teacher_logits: `(N, T, V)` teacher logits with the image (`q`).
        teacher_cf_logits: `(N, T, V)` teacher logits under the counterfactual view (`qbar`).
        mask: `(N, T)` valid-token mask.
        temperature: softmax temperature of all four distributions (the paper: 1).

    Returns:
        `VGSTerms(standard, visual, language, vds, target_shift, target_flip)`, each `(N, T)`, zero on invalid
        positions.
    """
    shapes = {tuple(t.shape) for t in (student_logits, student_cf_logits, teacher_logits, teacher_cf_logits)}
    if len(shapes) != 1 or tuple(student_logits.shape[:2]) != tuple(mask.shape):
        raise ValueError(
            f"vgs_token_terms needs four (N, T, V) logits and an (N, T) mask, got {shapes} and {tuple(mask.shape)}."
        )
    log_p = torch.log_softmax(student_logits / temperature, dim=-1)
    log_pbar = torch.log_softmax(student_cf_logits / temperature, dim=-1)
    log_q = torch.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    log_qbar = torch.log_softmax(teacher_cf_logits.detach() / temperature, dim=-1)
    log_q_star = torch.log_softmax(visual_target_logits(log_pbar, log_q, log_qbar), dim=-1)
    valid = mask.bool()

    def masked(values: torch.Tensor) -> torch.Tensor:
        # `where`, not a product: a padded position may hold non-finite values
        return torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))

    return VGSTerms(
        standard=masked(kl_from_logprobs(log_p, log_q)),
        visual=masked(kl_from_logprobs(log_p, log_q_star)),
        language=masked(kl_from_logprobs(log_pbar, log_qbar)),
        vds=masked(kl_from_logprobs(log_q, log_qbar)),
        target_shift=masked(kl_from_logprobs(log_q_star, log_q).detach()),
        target_flip=masked((log_q_star.argmax(-1) != log_q.argmax(-1)).to(log_q.dtype)),
    )


def valid_quantile(values: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """The `quantile` of `values` over the valid positions, interpolated linearly (as `torch.quantile`), in float64.

    Returns `0` when no position is valid. Written with a sort rather than `torch.quantile`, whose input size is
    limited, so that a whole generation batch of long responses fits.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}.")
    pooled = values.detach()[mask.bool()].double().sort().values
    if pooled.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=values.device)
    position = quantile * (pooled.numel() - 1)
    low = int(position)
    high = min(low + 1, pooled.numel() - 1)
    return pooled[low] + (position - low) * (pooled[high] - pooled[low])


def lp_mask(vds: torch.Tensor, mask: torch.Tensor, quantile: float = 0.7) -> torch.Tensor:
    """Language-prior mask `M_t = 1[VDS_t > Q_quantile]` (section "The terms"), the quantile over all valid tokens.

    The quantile must be taken over the whole generation batch (all micro-batches and processes), so that the loss
    does not depend on how the batch is split: pass the gathered batch.

    Returns:
        `(N, T)` boolean mask, false on invalid positions.
    """
    return mask.bool() & (vds.detach().double() > valid_quantile(vds, mask, quantile))


def adaptive_gamma(
    vds: torch.Tensor, mask: torch.Tensor, gamma: float, quantiles: Sequence[float] = (0.4, 0.7)
) -> torch.Tensor:
    """Per-token `gamma_t` of VGS's adaptive variant (section "The loss"), quantiles over every valid token given.

    `gamma_t = 0` where `VDS_t <= Q_low`, `gamma / 2` where `Q_low < VDS_t <= Q_high`, `gamma` above `Q_high`.

    Returns:
        `(N, T)` float64 `gamma_t`, zero on invalid positions.
    """
    low, high = quantiles
    if not 0.0 < low < high < 1.0:
        raise ValueError(f"adaptive gamma quantiles must satisfy 0 < low < high < 1, got {tuple(quantiles)}.")
    scores = vds.detach().double()
    q_low, q_high = valid_quantile(vds, mask, low), valid_quantile(vds, mask, high)
    steps = (scores > q_low).double() + (scores > q_high).double()  # 0, 1 or 2
    return torch.where(mask.bool(), gamma * steps / 2, torch.zeros_like(scores))


def vgs_token_loss(
    standard: torch.Tensor,
    visual: torch.Tensor,
    language: torch.Tensor,
    gamma: torch.Tensor | float,
    lp: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """Per-token VGS loss `l_t = l_std + gamma_t * l_vis + lambda * M_t * l_lang` (the paper's Eq. 16).

    Args:
        standard, visual, language: `(N, T)` terms (`VGSTerms` fields, or the chunked path's).
        gamma: the constant `gamma`, or `(N, T)` per-token `gamma_t` (`adaptive_gamma`).
        lp: `(N, T)` language-prior mask `M_t` (`lp_mask`).
        lam: `lambda`.
    """
    gamma = torch.as_tensor(gamma, device=standard.device).to(standard.dtype)
    return standard + gamma * visual + lam * lp.to(standard.dtype) * language


def vgs_loss(token_loss: torch.Tensor, coefficients: torch.Tensor, num_prompts: float, eta: float) -> torch.Tensor:
    """`L = eta * (1 / B) * sum_t c_t * l_t` (the paper's Eq. 17-18, and its composition with VA-OPD).

    With standard OPD's coefficients `c_t = 1 / (K n_k)` this is the paper's sequence mean, then mean over responses
    and prompts; with VA-OPD's coefficients (`docs/methods/va_opd.md`) it is the composed objective.
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0, got {eta}.")
    return eta * vaopd_loss(token_loss, coefficients, num_prompts)
