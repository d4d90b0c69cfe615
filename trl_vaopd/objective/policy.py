"""GRPO's policy-gradient term, for distillation mixed with a verifiable reward (`docs/methods/rewards.md`).

TRL's `GRPOTrainer` definitions, restated as pure tensor functions on the package's loss form
`(1 / B) * sum_t c_t * loss_t` over a generation batch of `B` prompts and `K` sibling rollouts each:

- rewards: the weighted sum of the reward functions' values (`None`, "not applicable", is skipped; a rollout that
  every function skips is unscorable and gets advantage 0);
- advantages: `A_i = r_i - mean_group(r)`, divided by `std + 1e-4` (`scale_rewards="group"`: the unbiased standard
  deviation within the sibling group; `"batch"`: over the whole generation batch; `"none"`: not divided);
- per-token loss: `-A_i * ratio_t` with `ratio_t = exp(log p(y_t) - log p_old(y_t))`. One optimizer step per
  generation batch samples with the parameters being trained, so the ratio is 1 and clipping never acts: the
  gradient is `-A_i * grad log p(y_t)`. The package writes that case only;
- aggregation (`loss_type`): `"grpo"` the mean over each response's tokens, then over responses; `"dapo"` the mean over
  every token of the generation batch; `"dr_grpo"` the sum over each response's tokens divided by
  `max_completion_length`, then the mean over responses.
"""

from __future__ import annotations

import torch

from .aggregation import token_mean_coefficients
from .va_opd import token_coefficients


__all__ = ["POLICY_LOSS_TYPES", "SCALE_REWARDS", "group_advantages", "policy_coefficients", "policy_token_loss"]

#: TRL GRPO `loss_type` names whose aggregation the package computes (split-invariant ones; not "bnpo").
POLICY_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
#: TRL GRPO `scale_rewards` choices.
SCALE_REWARDS = ("group", "batch", "none")


def _nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased standard deviation ignoring NaNs (TRL's `nanstd`)."""
    mean = torch.nanmean(values, dim=dim, keepdim=dim is not None)
    count = (~values.isnan()).sum(dim=dim) if dim is not None else (~values.isnan()).sum()
    variance = torch.nansum((values - mean) ** 2, dim=dim) / (count - 1)
    return variance.sqrt()


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's group-relative advantages of a whole generation batch, as TRL computes them.

    Args:
        rewards: `(N,)` reward of each rollout, siblings in consecutive groups of `num_generations`; NaN marks an
            unscorable rollout (every reward function returned `None`), left out of its group's mean and spread.
        num_generations: `K`, the siblings per prompt (at least 2).
        scale_rewards: `"group"`, `"batch"` or `"none"`.

    Returns:
        `(N,)` advantages (0 for unscorable rollouts) and `(N,)` the standard deviation each was scaled by (also
        computed, for the zero-spread metric, under `"none"`).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}.")
    if num_generations < 2 or rewards.numel() % num_generations:
        raise ValueError(
            f"group_advantages needs whole groups of num_generations >= 2 rollouts, got {rewards.numel()} rewards "
            f"and num_generations={num_generations}."
        )
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = _nanstd(rewards).expand_as(rewards)
    else:
        std = _nanstd(grouped, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), std


def policy_coefficients(
    mask: torch.Tensor,
    num_generations: int,
    loss_type: str,
    num_responses: int,
    num_tokens: int,
    max_completion_length: int,
) -> torch.Tensor:
    """Per-token coefficients of the policy term in the package's form `(1 / B) * sum_t c_t * loss_t`.

    Args:
        mask: `(N_local, T)` valid-token mask of some rollouts.
        num_generations: `K`, the size of every sibling group of the generation batch (wherever its rollouts are).
        loss_type: `"grpo"`, `"dapo"` or `"dr_grpo"`.
        num_responses: rollouts of the whole generation batch.
        num_tokens: valid tokens of the whole generation batch.
        max_completion_length: the `"dr_grpo"` constant.

    Returns:
        `(N_local, T)` coefficients: `"grpo"` gives `1 / (K n_i)` (each response's mean, then the mean over
        responses), `"dapo"` gives `B / T` on every token, `"dr_grpo"` `1 / (K * max_completion_length)`.
    """
    if loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(POLICY_LOSS_TYPES)}, got {loss_type!r}.")
    # 1 / K for every rollout: its group's share, also when the group is split across processes or micro-batches
    weights = torch.full((mask.size(0),), 1.0 / num_generations, dtype=torch.float64, device=mask.device)
    per_response = token_coefficients(torch.zeros(mask.shape, device=mask.device), mask, weights, group_tokens=False)
    if loss_type == "grpo":
        return per_response
    if loss_type == "dapo":
        return token_mean_coefficients(per_response, mask, num_responses, num_tokens)
    # Each response's mean times n_i / max_completion_length: its sum over tokens divided by the constant
    return per_response * mask.sum(dim=1, keepdim=True).to(per_response.dtype) / max_completion_length


def policy_token_loss(student_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token `-A_i * ratio_t` at ratio 1 (on-policy): value `-A_i`, gradient `-A_i * grad log p(y_t)`.

    Args:
        student_logp: `(N, T)` the student's log-probabilities of its sampled tokens, at the sampling temperature,
            with gradient.
        advantages: `(N,)` advantages (no gradient).
        mask: `(N, T)` valid-token mask.

    Returns:
        `(N, T)` per-token losses, zero on invalid positions.
    """
    ratio = torch.exp(student_logp - student_logp.detach())
    value = -advantages.detach().to(student_logp.dtype).unsqueeze(1) * ratio
    return torch.where(mask.bool(), value, torch.zeros_like(value))
