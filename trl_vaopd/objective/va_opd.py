"""The VA-OPD objective (`docs/methods/va_opd.md`) as pure tensor functions.

Everything here follows the method's equations (`docs/methods/va_opd.md`, "Visual advantage" to "The loss") and
knows nothing of trainers, models or processes: callers hand in per-token teacher log-probabilities, masks and
sibling-group ids, and get back visual advantages, rollout weights and per-token loss coefficients. Shapes: `N`
responses (rollouts), `T` completion positions; masks are `1` on valid tokens (generated tokens up to and including
the first EOS).

The visual advantage has two definitions (`VISUAL_ADVANTAGES`): the paper's, from the teacher's log-probabilities of
the sampled token (`visual_advantage`), and the package's own variant, the teacher's divergence between its two views'
next-token distributions (`view_kl_advantage`), which does not depend on the sampled token. Every function after them
takes either.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch


__all__ = [
    "VA_TOKEN_MASKS",
    "VISUAL_ADVANTAGES",
    "group_index",
    "high_va_mask",
    "mask_coefficients",
    "rollout_weights",
    "token_coefficients",
    "uniform_rollout_weights",
    "va_mass_share",
    "va_token_mask",
    "vaopd_loss",
    "view_kl_advantage",
    "visual_advantage",
]

#: Which tokens the masking analysis (`docs/methods/va_opd.md`, "The masking analysis") takes out of the KL.
VA_TOKEN_MASKS = ("top", "low", "random")

#: How a token's visual advantage is defined: the paper's gap of the teacher's log-probabilities of the sampled token
#: between its two views (`visual_advantage`), or the package's own variant, the teacher's KL between its two views'
#: next-token distributions (`view_kl_advantage`).
VISUAL_ADVANTAGES = ("sampled_token", "teacher_view_kl")


def visual_advantage(
    logp_original: torch.Tensor, logp_counterfactual: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-token visual advantage `a_t = max(log p_T(y_t | v) - log p_T(y_t | v~), 0)` (section "Visual advantage").

    Args:
        logp_original: `(N, T)` teacher log-probabilities of the sampled tokens with the original image.
        logp_counterfactual: `(N, T)` the same tokens scored with the counterfactual view.
        mask: `(N, T)` valid-token mask.

    Returns:
        `(N, T)` detached visual advantages, `0` on invalid positions.
    """
    if logp_original.shape != logp_counterfactual.shape or logp_original.shape != mask.shape:
        raise ValueError(
            f"visual_advantage needs equal shapes, got {tuple(logp_original.shape)}, "
            f"{tuple(logp_counterfactual.shape)} and mask {tuple(mask.shape)}."
        )
    gap = (logp_original.detach() - logp_counterfactual.detach()).clamp(min=0)
    # `where`, not a product: an invalid position may hold -inf log-probs, and inf * 0 is NaN
    return torch.where(mask.bool(), gap, torch.zeros_like(gap))


def view_kl_advantage(view_kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The package's variant of the visual advantage (not in the papers): `a_t = KL(q_t || qbar_t)`.

    `q_t` and `qbar_t` are the teacher's next-token distributions at position `t` with the original image and under the
    counterfactual view, over the full vocabulary. Unlike `visual_advantage`, it does not depend on which token the
    student sampled at `t`: a position where the image decides the answer scores high whether the student read the
    image right or wrong. It is VGS's visual dependency score (`trl_vaopd.objective.vgs.VGSTerms.vds`); the caller
    computes it (the trainer on token chunks, `trl_vaopd.chunked.per_token_divergence` with the teacher's head on both
    sides), and this function makes it a visual advantage.

    Args:
        view_kl: `(N, T)` per-token `KL(q || qbar)`.
        mask: `(N, T)` valid-token mask.

    Returns:
        `(N, T)` detached visual advantages, `0` on invalid positions. Negative values, which only float rounding of a
        KL near zero produces, are clipped to `0`, as the paper's advantage is.
    """
    if view_kl.shape != mask.shape:
        raise ValueError(
            f"view_kl_advantage needs equal shapes, got {tuple(view_kl.shape)} and mask {tuple(mask.shape)}."
        )
    values = view_kl.detach().clamp(min=0)
    # `where`, not a product: an invalid position may hold a non-finite value
    return torch.where(mask.bool(), values, torch.zeros_like(values))


def group_index(group_ids: torch.Tensor | Sequence[Hashable]) -> torch.Tensor:
    """Map arbitrary sibling-group ids (a 1-D integer tensor or a sequence of hashables) to `0..G-1` (a long tensor)."""
    if isinstance(group_ids, torch.Tensor):
        if group_ids.ndim != 1:
            raise ValueError(f"group_ids must be 1-D, got shape {tuple(group_ids.shape)}.")
        return torch.unique(group_ids, return_inverse=True)[1]
    codes: dict[Hashable, int] = {}
    return torch.tensor([codes.setdefault(g, len(codes)) for g in group_ids], dtype=torch.long)


def _group_sum(values: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)


def rollout_weights(
    mean_va: torch.Tensor,
    group_ids: torch.Tensor | Sequence[Hashable],
    temperature: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Rollout weights from the relative mean VA of sibling responses (section "Rollout weights").

    Within each group of siblings (responses to the same prompt): `z_k = (m_k - mean_j m_j) / (std_j m_j + eps)` with
    the population standard deviation, then `w_k = softmax_k(z_k / temperature)`. Each group's weights sum to 1; equal
    means give uniform weights and a single response gets weight 1.

    Args:
        mean_va: `(N,)` mean visual advantage of each response over its valid tokens.
        group_ids: `(N,)` sibling-group id of each response. Groups must be complete: every sibling of a prompt in
            the generation batch must be present, also those computed on other micro-batches or processes.
        temperature: softmax temperature `tau`.
        eps: stabiliser added to the standard deviation.

    Returns:
        `(N,)` detached weights.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}.")
    m = mean_va.detach()
    index = group_index(group_ids).to(m.device)
    if index.numel() != m.numel():
        raise ValueError(f"group_ids has {index.numel()} entries but mean_va has {m.numel()}.")
    num_groups = int(index.max()) + 1 if index.numel() else 0
    size = _group_sum(torch.ones_like(m), index, num_groups)
    mean = _group_sum(m, index, num_groups) / size
    centred = m - mean[index]
    std = (_group_sum(centred.square(), index, num_groups) / size).sqrt()
    logits = centred / (std[index] + eps) / temperature
    # Subtracting each group's max keeps exp() finite; it cancels in the normalisation
    group_max = torch.full((num_groups,), -math.inf, dtype=m.dtype, device=m.device).scatter_reduce(
        0, index, logits, reduce="amax"
    )
    expd = (logits - group_max[index]).exp()
    return expd / _group_sum(expd, index, num_groups)[index]


def uniform_rollout_weights(group_ids: torch.Tensor | Sequence[Hashable]) -> torch.Tensor:
    """Weights `1 / K_g` for every response of a group of `K_g` siblings: standard OPD's mean over responses."""
    index = group_index(group_ids)
    num_groups = int(index.max()) + 1 if index.numel() else 0
    size = _group_sum(torch.ones(index.numel(), dtype=torch.float64), index, num_groups)
    return (1.0 / size)[index]


def _num_high(n_valid: torch.Tensor, high_fraction: float) -> torch.Tensor:
    # ceil(rho * n) in float64 with a small slack, so that e.g. 0.1 * 30 = 3.0000000000000004 counts 3, not 4
    return torch.ceil(n_valid.double() * high_fraction - 1e-9).clamp(min=0).long()


def high_va_mask(va: torch.Tensor, mask: torch.Tensor, high_fraction: float = 0.2) -> torch.Tensor:
    """The high-VA token group `V` of each response (section "Token groups").

    `V` holds the top `ceil(high_fraction * n)` valid tokens of a response with `n` valid tokens, ranked by VA; ties
    go to the earlier position.

    Returns:
        `(N, T)` boolean mask of the high group.
    """
    if not 0.0 < high_fraction <= 1.0:
        raise ValueError(f"high_fraction must be in (0, 1], got {high_fraction}.")
    valid = mask.bool()
    keys = torch.where(valid, va.detach().double(), torch.full_like(va, -math.inf, dtype=torch.float64))
    # A stable descending sort keeps equal scores in position order, which is the tie rule
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(va.size(1), device=va.device).expand_as(order))
    k_high = _num_high(valid.sum(dim=1), high_fraction)
    return valid & (rank < k_high.unsqueeze(1))


def token_coefficients(
    va: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    high_fraction: float = 0.2,
    high_weight: float = 0.5,
    *,
    group_tokens: bool = True,
) -> torch.Tensor:
    """Per-token loss coefficients `c_t` (section "Token groups").

    With token grouping, `c_t = w_k * high_weight / |V|` on the high-VA group `V` and `w_k * (1 - high_weight) / |L|`
    on the rest `L`; when `L` is empty (one valid token, or `high_fraction = 1`) all of `w_k` is spread over `V`.
    Without grouping, `c_t = w_k / n` (the mean token KL of standard OPD). Either way a response's coefficients sum to
    `w_k`; a response with no valid token gets none.

    Args:
        va: `(N, T)` visual advantages.
        mask: `(N, T)` valid-token mask.
        weights: `(N,)` rollout weights.
        high_fraction: fraction `rho` of a response's valid tokens in the high group.
        high_weight: mass `lambda` given to the high group.
        group_tokens: whether to split tokens into the high and low groups.

    Returns:
        `(N, T)` detached coefficients, in `weights`' dtype (at least float32).
    """
    if not 0.0 <= high_weight <= 1.0:
        raise ValueError(f"high_weight must be in [0, 1], got {high_weight}.")
    valid = mask.bool()
    dtype = torch.promote_types(weights.dtype, torch.float32)
    w = weights.detach().to(dtype).unsqueeze(1)
    n_valid = valid.sum(dim=1, keepdim=True).to(dtype)
    if not group_tokens:
        return torch.where(valid, w / n_valid.clamp(min=1), torch.zeros((), dtype=dtype, device=va.device))
    high = high_va_mask(va, mask, high_fraction)
    n_high = high.sum(dim=1, keepdim=True).to(dtype)
    n_low = n_valid - n_high
    # An empty low group hands its share to the high group, so the response still sums to w_k
    high_share = torch.where(n_low > 0, torch.as_tensor(high_weight, dtype=dtype), torch.ones((), dtype=dtype))
    c_high = w * high_share / n_high.clamp(min=1)
    c_low = w * (1 - high_weight) / n_low.clamp(min=1)
    zero = torch.zeros((), dtype=dtype, device=va.device)
    return torch.where(high, c_high, torch.where(valid, c_low, zero))


def vaopd_loss(per_token_kl: torch.Tensor, coefficients: torch.Tensor, num_prompts: float) -> torch.Tensor:
    """`L = (1 / B) * sum_t c_t * KL_t` over all responses and valid tokens (section "The loss").

    `coefficients` must be zero on invalid positions (as `token_coefficients` returns them); they carry no gradient.
    """
    if num_prompts <= 0:
        raise ValueError(f"num_prompts must be > 0, got {num_prompts}.")
    return (coefficients.detach().to(per_token_kl.dtype) * per_token_kl).sum() / num_prompts


def va_mass_share(va: torch.Tensor, mask: torch.Tensor, fraction: float = 0.1) -> float:
    """Share of the total VA mass held by the top `ceil(fraction * n)` of the `n` valid tokens, pooled over responses.

    The paper reports about 0.93 for the top 10% of tokens. Returns `0.0` when there is no VA mass at all.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    values = va.detach()[mask.bool()].double()
    total = values.sum()
    if values.numel() == 0 or total <= 0:
        return 0.0
    k = int(_num_high(torch.tensor(values.numel()), fraction))
    return float(values.topk(k).values.sum() / total)


def va_token_mask(
    va: torch.Tensor, mask: torch.Tensor, mode: str, fraction: float, tie_breaker: torch.Tensor
) -> torch.Tensor:
    """The tokens the paper's masking analysis (section "The masking analysis") takes out of each response's KL.

    Each response with `n` valid tokens loses `min(ceil(fraction * n), n - 1)` of them (at least one token stays):
    the highest-VA ones (`"top"`), the lowest-VA ones (`"low"`) or random ones (`"random"`). Ties are broken by
    `tie_breaker`, not by position: many tokens have a VA of exactly 0 (the gap is clipped), and a positional rule
    would always pick the first of them; `"random"` is the all-ties case.

    Args:
        va: `(N, T)` visual advantages.
        mask: `(N, T)` valid-token mask.
        mode: `"top"`, `"low"` or `"random"`.
        fraction: fraction of each response's valid tokens to mask, in `(0, 1)`.
        tie_breaker: `(N, T)` distinct random keys (e.g. uniform noise); the caller draws them, so that the result is
            a pure function of its inputs.

    Returns:
        `(N, T)` boolean mask of the tokens taken out of the KL.
    """
    if mode not in VA_TOKEN_MASKS:
        raise ValueError(f"mode must be one of {VA_TOKEN_MASKS}, got {mode!r}.")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}.")
    valid = mask.bool()
    n_valid = valid.sum(dim=1)
    k = torch.minimum(_num_high(n_valid, fraction), (n_valid - 1).clamp(min=0))
    keys = {"random": torch.zeros_like(va, dtype=torch.float64), "top": va.double(), "low": -va.double()}[mode]
    keys = torch.where(valid, keys, torch.full_like(keys, -math.inf))
    # Sort by (key, tie breaker): a stable sort by key of the rows pre-ordered by the tie breaker
    shuffle = tie_breaker.argsort(dim=1)
    order = shuffle.gather(1, torch.sort(keys.gather(1, shuffle), dim=1, descending=True, stable=True).indices)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(va.size(1), device=va.device).expand_as(order))
    return valid & (rank < k.unsqueeze(1))


def mask_coefficients(coefficients: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Spread each response's total coefficient `w_k` evenly over its valid tokens that are not `masked`.

    The loss of a response is then `w_k` times the mean KL of its kept tokens (standard OPD without the masked ones).
    """
    kept = mask.bool() & ~masked
    weights = coefficients.sum(dim=1, keepdim=True)
    return torch.where(kept, weights / kept.sum(dim=1, keepdim=True).clamp(min=1), torch.zeros_like(coefficients))
