"""How the per-token losses of a generation batch are averaged: per response, or over every token alike.

Every method's loss is `(1 / B) * sum_t c_t * loss_t` over the generation batch's `B` prompts, with per-token
coefficients `c_t` that sum to a response's rollout weight `w_k` (`1 / K` without VA-OPD's weighting): the mean token
loss of each response, then the mean over responses and prompts (`"response_mean"`, TRL GRPO's `loss_type="grpo"`
normalisation, verl's `seq-mean-token-mean`). `"token_mean"` (TRL GRPO's `loss_type="dapo"` normalisation, verl's
`token-mean`, which the ViCuR authors train with) weighs every valid token of the generation batch alike: each
response's coefficients are scaled by its token count over the batch's mean count, so that with uniform weights the
loss is the plain mean over all `T` valid tokens of the batch, `(1 / T) * sum_t loss_t`.
"""

from __future__ import annotations

import torch


__all__ = ["LOSS_AGGREGATIONS", "token_mean_coefficients"]

#: The per-token loss aggregations `VAOPDConfig.loss_aggregation` takes.
LOSS_AGGREGATIONS = ("response_mean", "token_mean")


def token_mean_coefficients(
    coefficients: torch.Tensor, mask: torch.Tensor, num_responses: int, num_tokens: int
) -> torch.Tensor:
    """Per-response-mean coefficients turned into token-mean ones: `c_t * n_k * N / T`.

    Args:
        coefficients: `(N_local, T)` coefficients of some responses, each response summing to its weight `w_k`.
        mask: `(N_local, T)` their valid-token mask (`n_k` valid tokens in response k).
        num_responses: `N`, the responses of the whole generation batch (every process, every micro-batch).
        num_tokens: `T`, the valid tokens of the whole generation batch.

    Returns:
        `(N_local, T)` coefficients: response k's sum to `w_k * n_k * N / T`, so that with uniform weights
        `w_k = 1 / K` every valid token gets `B / T` and `(1 / B) * sum_t c_t * loss_t` is the mean over all tokens.
    """
    if num_tokens <= 0 or num_responses <= 0:
        raise ValueError(f"num_responses and num_tokens must be > 0, got {num_responses} and {num_tokens}.")
    lengths = mask.sum(dim=1, keepdim=True).to(coefficients.dtype)
    return coefficients * lengths * (num_responses / num_tokens)
