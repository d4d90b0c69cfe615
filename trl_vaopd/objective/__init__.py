"""The objectives as pure tensor functions, one module per method; they know nothing of trainers or processes.

- `trl_vaopd.objective.va_opd`: VA-OPD (`docs/methods/va_opd.md`): visual advantage (the paper's, and the package's
  variant that does not depend on the sampled token), rollout weights, token coefficients, the loss, and the paper's
  VA masking analysis. Standard OPD is its special case with both components off.
- `trl_vaopd.objective.vgs`: VGS (`docs/methods/vgs.md`): the four per-token terms, the language-prior mask, adaptive
  gamma and the loss, composable with VA-OPD's coefficients.
- `trl_vaopd.objective.vicur`: ViCuR's sampled-token estimate of the reverse KL (`docs/methods/vicur.md`, "The
  objective").
- `trl_vaopd.objective.policy`: GRPO's policy-gradient term for a verifiable reward (group advantages, aggregation).
- `trl_vaopd.objective.aggregation`: how the per-token losses are averaged (per response, or over all tokens alike).

Everything public is importable from `trl_vaopd.objective` directly.
"""

from .aggregation import LOSS_AGGREGATIONS, token_mean_coefficients
from .policy import POLICY_LOSS_TYPES, SCALE_REWARDS, group_advantages, policy_coefficients, policy_token_loss
from .va_opd import (
    VA_TOKEN_MASKS,
    VISUAL_ADVANTAGES,
    group_index,
    high_va_mask,
    mask_coefficients,
    rollout_weights,
    token_coefficients,
    uniform_rollout_weights,
    va_mass_share,
    va_token_mask,
    vaopd_loss,
    view_kl_advantage,
    visual_advantage,
)
from .vgs import (
    VGSTerms,
    adaptive_gamma,
    kl_from_logprobs,
    lp_mask,
    valid_quantile,
    vgs_loss,
    vgs_token_loss,
    vgs_token_terms,
    visual_target_logits,
)
from .vicur import sampled_token_kl


__all__ = [
    "LOSS_AGGREGATIONS",
    "POLICY_LOSS_TYPES",
    "SCALE_REWARDS",
    "VA_TOKEN_MASKS",
    "VGSTerms",
    "VISUAL_ADVANTAGES",
    "adaptive_gamma",
    "group_advantages",
    "group_index",
    "high_va_mask",
    "kl_from_logprobs",
    "lp_mask",
    "mask_coefficients",
    "policy_coefficients",
    "policy_token_loss",
    "rollout_weights",
    "sampled_token_kl",
    "token_coefficients",
    "token_mean_coefficients",
    "uniform_rollout_weights",
    "va_mass_share",
    "va_token_mask",
    "valid_quantile",
    "vaopd_loss",
    "vgs_loss",
    "vgs_token_loss",
    "vgs_token_terms",
    "view_kl_advantage",
    "visual_advantage",
    "visual_target_logits",
]
