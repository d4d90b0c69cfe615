"""`VAOPDConfig`: TRL's `DistillationConfig` plus the VA-OPD settings, with the paper's recipe as defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.utils import is_torch_bf16_gpu_available, logging
from trl import DistillationConfig
from trl.import_utils import is_vllm_available

from .names import did_you_mean
from .objective import LOSS_AGGREGATIONS, POLICY_LOSS_TYPES, SCALE_REWARDS, VA_TOKEN_MASKS, VISUAL_ADVANTAGES
from .privileged import DEFAULT_CUE_TEMPLATE
from .views import VIEW_NAMES


logger = logging.get_logger(__name__)

#: Each published method, as the component switches it turns on (every other switch is off).
METHOD_COMPONENTS: dict[str, frozenset[str]] = {
    "opd": frozenset(),
    "va_opd": frozenset({"rollout_weighting", "token_grouping"}),
    "vgs": frozenset({"vgs"}),
    "vicur": frozenset({"use_cues", "cue_recovery"}),
}

#: How the loss estimates the per-token divergence: over the full vocabulary, or from the sampled token alone.
KL_ESTIMATORS = ("full", "sampled_token")


@dataclass
class VAOPDConfig(DistillationConfig):
    r"""
    Configuration class for the [`VAOPDTrainer`].

    Extends [`~trl.DistillationConfig`] with the settings of Visual-Advantage On-Policy Distillation (VA-OPD,
    [arXiv 2605.21924](https://huggingface.co/papers/2605.21924)). Every field of `DistillationConfig` keeps its
    meaning, except that the sampling `temperature` no longer sets the temperature of the divergence: that is
    `divergence_temperature`.

    Parameters:
        > Parameters that control the rollouts

        num_generations (`int`, *optional*, defaults to `4`):
            Number of responses `K` sampled per prompt (sibling rollouts). The generation batch
            (`per_device_train_batch_size * num_processes * gradient_accumulation_steps`) must be a multiple of it, and
            so must the global evaluation batch when an evaluation set is given.
        temperature (`float`, *optional*, defaults to `0.7`):
            Sampling temperature of the student's rollouts (paper: 0.7). It does not affect the loss.
        top_p (`float`, *optional*, defaults to `0.95`):
            Top-p sampling parameter of the student's rollouts (paper: 0.95).

        > Parameters that control the objective

        beta (`float`, *optional*, defaults to `1.0`):
            Divergence of TRL's generalized Jensen-Shannon family: `1.0` is the reverse KL `KL(p_S || p_T)` of the
            paper, `0.0` the forward KL, values in between the generalized JSD.
        divergence_temperature (`float`, *optional*, defaults to `1.0`):
            Temperature of the student and teacher distributions in the per-token divergence, and of the teacher
            log-probabilities that define the visual advantage. Independent of the sampling `temperature`.
        counterfactual_view (`str`, *optional*, defaults to `"pixelate"`):
            How the teacher's second view removes visual detail: `"pixelate"` (downsample by `pixelate_ratio`, then
            upsample back), `"blur"`, `"blank"` (the image's mean colour) or `"drop"` (no image: a text-only
            counterfactual). A custom image -> image callable (same size) can be passed to the trainer as its
            `counterfactual_view` argument instead.
        pixelate_ratio (`float`, *optional*, defaults to `0.1`):
            Side-length ratio of the pixelate view's downsampling, in `(0, 1]`.
        va_high_fraction (`float`, *optional*, defaults to `0.2`):
            Fraction `rho` of each response's valid tokens, by visual advantage, in the high-VA group, in `(0, 1]`.
        va_high_weight (`float`, *optional*, defaults to `0.5`):
            Share `lambda` of a response's weight given to its high-VA group, in `[0, 1]`.
        va_weight_temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature `tau` of the rollout weights, `> 0`.
        va_eps (`float`, *optional*, defaults to `1e-6`):
            Stabiliser added to the standard deviation of sibling mean VAs, `> 0`.
        visual_advantage (`str`, *optional*, defaults to `"sampled_token"`):
            How a token's visual advantage (VA) is defined, wherever VA is used (rollout weights, token groups, the
            masking analysis, the VA metrics). `"sampled_token"`: the paper's, the gap of the teacher's log-probability
            of the sampled token between the original and the counterfactual view, clipped at 0. `"teacher_view_kl"`:
            the package's own variant, not in the papers: the teacher's `KL(q || qbar)` between its two views'
            next-token distributions over the full vocabulary (VGS's visual dependency score), which does not depend on
            the sampled token, so a position where the image decides the answer scores high whether the student read
            the image right or wrong (`docs/methods/va_opd.md`, "Variant: the teacher's view divergence"). It costs no
            extra model pass. Needs a component that uses VA.
        method (`list[str]`, *optional*, defaults to `["va_opd"]`):
            The published method(s) to run: `"opd"` (standard on-policy distillation), `"va_opd"` (VA-OPD), `"vgs"`
            (Visual Gradient Steering), `"vicur"` (ViCuR: a teacher that sees a visual cue, and the student's
            cue-recovery module), or a list that composes them, e.g. `["va_opd", "vgs"]` (VA-OPD's coefficients then
            replace VGS's per-sequence mean). A single name may be given as a string. It presets the component
            switches below; a switch given explicitly overrides the preset.
        rollout_weighting (`bool`, *optional*):
            Whether to weight sibling rollouts by their relative mean VA. Off: uniform weights `1 / K`. Defaults to the
            `method` preset (on for `"va_opd"`).
        token_grouping (`bool`, *optional*):
            Whether to average the KL separately over the high- and low-VA token groups. Off: the mean token KL of each
            response. With both switches off (and `vgs` off) the objective is standard OPD (mean token KL per
            response, mean over responses). Defaults to the `method` preset (on for `"va_opd"`).
        vgs (`bool`, *optional*):
            Whether to use VGS's decomposed objective `l_std + gamma * l_vis + lambda * M * l_lang`, scaled by `eta`:
            the teacher and the student both run under the original and the counterfactual view. Defaults to the
            `method` preset (on for `"vgs"`).
        use_cues (`bool`, *optional*):
            Whether the teacher sees a privileged prompt: the student's prompt with the row's cue (column
            `cue_column`) appended to the last user turn, or the row's full teacher prompt (`teacher_prompt_column`).
            Every teacher view (the KL target, VA, VGS's `q` and `qbar`) uses it; the student never sees it. Rows
            with an empty or missing cue are refused. Defaults to the `method` preset (on for `"vicur"`).
        cue_recovery (`bool`, *optional*):
            Whether the student gets ViCuR's cue-recovery module (sink-token cross-attention to the image tokens during
            prefill, `trl_vaopd.cue_recovery`); it trains with the student and is saved with it. Not with vLLM, which
            would sample without it; refused on families without it (`trl_vaopd.families.FAMILIES`). Defaults to the `method` preset (on for `"vicur"`).
        kl_estimator (`str`, *optional*, defaults to `"full"`):
            `"full"`: the per-token divergence over the full vocabulary. `"sampled_token"`: ViCuR's sampled-token
            estimate of the reverse KL, whose gradient is `-A_t * grad log p_S(y_t)` with
            `A_t = log p_T(y_t) - log p_S(y_t)`; the full KL is its exact expectation. Needs `beta=1.0` and VGS off;
            the teacher's hidden states are then not kept.
        loss_aggregation (`str`, *optional*):
            How the per-token losses of a generation batch are averaged. `"response_mean"`: each response's mean
            token loss (its coefficients summing to its rollout weight), then the mean over responses and prompts
            (TRL GRPO's `loss_type="grpo"` normalisation). `"token_mean"`: every valid token of the generation batch
            weighs alike, each response's coefficients scaled by its token count over the batch's mean (TRL GRPO's
            `loss_type="dapo"` normalisation, verl's `token-mean`). Either way the normalisers are counted over the
            whole generation batch, so the update does not depend on its split over micro-batches, accumulation
            steps and processes. Defaults to `"token_mean"` for `method="vicur"` alone (the ViCuR authors' recipe)
            and `"response_mean"` otherwise (VA-OPD's rollout weights and token groups, and VGS's sequence mean,
            are defined per response).

        prefix_sharing (`bool`, *optional*, defaults to `True`):
            Whether sibling rollouts, which share their prompt (image included), run it once per model pass: the prompt
            of each group runs with a KV cache that the completions continue. Exact (up to float rounding) for
            the families `trl_vaopd.families.FAMILIES` marks (`prefix_sharing`); other families, and a student with
            gradient checkpointing, run full passes (logged once). Off: every rollout runs prompt and completion in full, as TRL's trainer.
        teacher_batch_size (`int` or `None`, *optional*, defaults to `None`):
            The most rollouts one teacher call scores at once. `None`: a micro-batch (`per_device_train_batch_size`;
            in evaluation `per_device_eval_batch_size`), so the teacher never holds more rows than in TRL's trainer.
            Larger (up to the local generation batch, or twice it for a view that keeps the image layout, whose two
            views then share each call): fewer, larger teacher calls, for the teacher's activations and KV cache of
            as many rows at once. Calls are cut along sibling groups either way, so the positions run are the same;
            only the number of calls changes (`benchmarks/README.md`, "Layouts", measures both sides).
        gradient_checkpointing (`bool`, *optional*, defaults to `True`):
            TRL's setting: recompute the student's activations in the backward instead of keeping them. transformers
            runs a checkpointed model without a KV cache, so the student then runs full passes, without prefix
            sharing. Measured (`benchmarks/bench_checkpointing.py`, a small Qwen3-VL student, long image prompts, K=4):
            2.9x the student's forward + backward time, 1.7x the step, for 8% less peak memory. Turn it off when the
            student's activations fit.

        > Parameters of ViCuR (used when `use_cues` or `cue_recovery` is on)

        cue_column (`str`, *optional*, defaults to `"cue"`):
            Dataset column holding each row's cue text.
        teacher_prompt_column (`str`, *optional*):
            Dataset column holding each row's full teacher prompt (a conversation, images inserted as in `prompt`),
            used instead of appending the cue.
        cue_template (`str`, *optional*, defaults to `"\n[Hint]: {cue}"`):
            How the cue is appended to the last user turn (OPSD's hint format); must contain `{cue}`.
        cue_recovery_interval (`int`, *optional*, defaults to `5`):
            The module runs after every decoder layer whose index is a multiple of this interval (0, 5, 10, ...).

        > Parameters of VGS (used when `vgs` is on; the paper's values for a 2B student)

        vgs_gamma (`float`, *optional*, defaults to `2.0`):
            Weight `gamma >= 0` of the visual term `KL(p || q*)`.
        vgs_lambda (`float`, *optional*, defaults to `0.01`):
            Weight `lambda >= 0` of the language-prior term `KL(pbar || qbar)` on the masked tokens. With `0` the
            student's counterfactual pass runs without gradient.
        vgs_eta (`float`, *optional*, defaults to `0.41`):
            Scale `eta > 0` of the whole loss (the paper: 0.41 for a 2B student, 0.36 for 4B).
        vgs_lp_quantile (`float`, *optional*, defaults to `0.7`):
            Quantile of the visual dependency score `VDS = KL(q || qbar)` over every valid token of the generation
            batch above which a token is in the language-prior mask, in `(0, 1)`.
        vgs_adaptive_gamma (`bool`, *optional*, defaults to `False`):
            VGS's adaptive variant: `gamma_t = 0`, `gamma / 2` or `gamma` as the token's VDS is at most the first
            quantile of `vgs_adaptive_gamma_quantiles`, between the two, or above the second.
        vgs_adaptive_gamma_quantiles (`list[float]`, *optional*, defaults to `[0.4, 0.7]`):
            The two VDS quantiles of the adaptive variant, `0 < low < high < 1`.

        > Parameters of verifiable rewards (used when the trainer is given `reward_funcs`; TRL GRPO's meanings)

        distillation_weight (`float`, *optional*, defaults to `1.0`):
            The loss is `(1 - distillation_weight) * policy_loss + distillation_weight * distillation_loss`, as in
            TRL's `sdpo`: `1.0` is the distillation objective alone (rewards, if any, are only logged), `0.0` is
            GRPO alone, `0.3` the VGS paper's mix (`alpha = 0.3`). In `[0, 1]`; below `1.0` it needs `reward_funcs`.
        reward_weights (`list[float]`, *optional*):
            Weights of the reward functions in the reward, one per function; all `1.0` when `None`.
        scale_rewards (`str`, *optional*, defaults to `"group"`):
            How advantages are scaled: `"group"` (by the unbiased standard deviation of the sibling group's rewards),
            `"batch"` (of the whole generation batch's) or `"none"`; each adds `1e-4` to the spread, as TRL does.
        loss_type (`str`, *optional*, defaults to `"dapo"`):
            Aggregation of the policy term's per-token losses, with TRL GRPO's names: `"dapo"` (the mean over every
            token of the generation batch), `"grpo"` (each response's mean, then the mean over responses) or
            `"dr_grpo"` (each response's sum over `max_completion_length`, then the mean). TRL's `"bnpo"` normalises
            by the micro-batch's tokens, which would make the update depend on the split, and is refused. The
            distillation term is aggregated by `loss_aggregation`.

        > Parameters of the analyses

        va_token_mask (`str`, *optional*):
            The VA-OPD paper's masking analysis (`docs/methods/va_opd.md`, "The masking analysis"): take the
            `"top"` (highest-VA), `"low"` (lowest-VA) or `"random"` tokens of each response out of the KL, the rest
            averaged as in standard OPD. Needs `token_grouping=False`. `None` masks nothing.
        va_token_mask_fraction (`float`, *optional*, defaults to `0.1`):
            Fraction of each response's valid tokens masked (at least one token stays), in `(0, 1)`.
        log_va_metrics (`bool`, *optional*, defaults to `False`):
            Under standard OPD no component needs the counterfactual view, so the teacher runs once per rollout as in
            TRL and no VA metric is logged. Set this to score the counterfactual view anyway (one more teacher pass
            per rollout) and log the VA metrics. Methods that need the view always log them.

    > [!NOTE]
    > These parameters have default values different from [`~trl.DistillationConfig`]:
    > - `temperature`: `0.7` instead of `1.0` (it only sets sampling here).
    > - `top_p`: `0.95` instead of `1.0`.
    """

    num_generations: int = field(
        default=4,
        metadata={"help": "Number of responses K sampled per prompt (sibling rollouts)."},
    )
    temperature: float = field(
        default=0.7,
        metadata={"help": "Sampling temperature of the student's rollouts. It does not affect the loss."},
    )
    top_p: float = field(
        default=0.95,
        metadata={"help": "Top-p sampling parameter of the student's rollouts."},
    )
    divergence_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Temperature of both distributions in the per-token divergence and of the teacher log-probs that "
            "define the visual advantage. Independent of the sampling temperature."
        },
    )
    counterfactual_view: str = field(
        default="pixelate",
        metadata={"help": "Counterfactual view of the image.", "choices": list(VIEW_NAMES)},
    )
    pixelate_ratio: float = field(
        default=0.1,
        metadata={"help": "Side-length ratio of the pixelate view's downsampling, in (0, 1]."},
    )
    va_high_fraction: float = field(
        default=0.2,
        metadata={"help": "Fraction rho of each response's valid tokens in the high-VA group, in (0, 1]."},
    )
    va_high_weight: float = field(
        default=0.5,
        metadata={"help": "Share lambda of a response's weight given to its high-VA group, in [0, 1]."},
    )
    va_weight_temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature tau of the rollout weights, > 0."},
    )
    va_eps: float = field(
        default=1e-6,
        metadata={"help": "Stabiliser added to the standard deviation of sibling mean VAs, > 0."},
    )
    visual_advantage: str = field(
        default="sampled_token",
        metadata={
            "help": "Visual advantage: the paper's gap of the teacher's log-prob of the sampled token between its two "
            "views, or the package's variant, the teacher's KL between its two views' next-token distributions.",
            "choices": list(VISUAL_ADVANTAGES),
        },
    )
    method: list[str] = field(
        default_factory=lambda: ["va_opd"],
        metadata={
            "help": "Published method(s) to run: opd, va_opd, vgs, vicur, or several to compose them (e.g. va_opd "
            "vgs). Presets the component switches.",
        },
    )
    rollout_weighting: bool | None = field(
        default=None,
        metadata={"help": "Weight sibling rollouts by their relative mean VA; None: the method's preset."},
    )
    token_grouping: bool | None = field(
        default=None,
        metadata={"help": "Average the KL separately over the high- and low-VA token groups; None: the preset."},
    )
    vgs: bool | None = field(
        default=None,
        metadata={"help": "Use VGS's decomposed objective; None: the method's preset."},
    )
    use_cues: bool | None = field(
        default=None,
        metadata={"help": "Give the teacher the privileged prompt with the row's cue; None: the method's preset."},
    )
    cue_recovery: bool | None = field(
        default=None,
        metadata={"help": "Add ViCuR's cue-recovery module to the student; None: the method's preset."},
    )
    kl_estimator: str = field(
        default="full",
        metadata={
            "help": "Per-token divergence: over the full vocabulary, or ViCuR's sampled-token estimate.",
            "choices": list(KL_ESTIMATORS),
        },
    )
    loss_aggregation: str | None = field(
        default=None,
        metadata={
            "help": "Average the per-token losses per response ('response_mean') or over all tokens ('token_mean'); "
            "default: token_mean for method vicur alone, else response_mean.",
            "choices": list(LOSS_AGGREGATIONS),
        },
    )
    prefix_sharing: bool = field(
        default=True,
        metadata={"help": "Run each sibling group's shared prompt once per model pass, where that is exact."},
    )
    teacher_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Most rollouts one teacher call scores at once; default: a micro-batch, as TRL's teacher. Larger: "
            "fewer, larger calls for more teacher memory."
        },
    )
    gradient_checkpointing: bool = field(
        default=True,
        metadata={
            "help": "Recompute the student's activations in the backward (TRL's default). The student then runs full "
            "passes, without prefix sharing: measured 2.9x its time for 8%% less peak memory (README). Turn it off "
            "when its activations fit."
        },
    )
    cue_column: str = field(default="cue", metadata={"help": "Dataset column of the cues."})
    teacher_prompt_column: str | None = field(
        default=None, metadata={"help": "Dataset column of full teacher prompts, used instead of appending the cue."}
    )
    cue_template: str = field(
        default=DEFAULT_CUE_TEMPLATE, metadata={"help": "How the cue is appended to the last user turn ({cue})."}
    )
    cue_recovery_interval: int = field(
        default=5,
        metadata={"help": "The cue-recovery module follows every decoder layer whose index is a multiple of this."},
    )
    vgs_gamma: float = field(default=2.0, metadata={"help": "VGS weight gamma >= 0 of the visual term."})
    vgs_lambda: float = field(default=0.01, metadata={"help": "VGS weight lambda >= 0 of the language-prior term."})
    vgs_eta: float = field(default=0.41, metadata={"help": "VGS scale eta > 0 of the whole loss."})
    vgs_lp_quantile: float = field(
        default=0.7, metadata={"help": "VDS quantile of the generation batch above which the LP mask is set."}
    )
    vgs_adaptive_gamma: bool = field(default=False, metadata={"help": "Use VGS's adaptive gamma variant."})
    vgs_adaptive_gamma_quantiles: list[float] = field(
        default_factory=lambda: [0.4, 0.7],
        metadata={"help": "The two VDS quantiles of the adaptive gamma variant."},
    )
    distillation_weight: float = field(
        default=1.0,
        metadata={"help": "Loss = (1 - w) * GRPO policy loss + w * distillation loss; 1.0: distillation alone."},
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of the reward functions; None: 1.0 each."}
    )
    scale_rewards: str = field(
        default="group",
        metadata={
            "help": "Advantage scaling: by the group's or the batch's reward spread, or none.",
            "choices": list(SCALE_REWARDS),
        },
    )
    loss_type: str = field(
        default="dapo",
        metadata={"help": "Aggregation of the policy term (TRL GRPO's names).", "choices": list(POLICY_LOSS_TYPES)},
    )
    va_token_mask: str | None = field(
        default=None,
        metadata={
            "help": "Masking analysis: take the top, low or random VA tokens out of the KL; None masks nothing."
        },
    )
    va_token_mask_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of each response's tokens masked by va_token_mask, in (0, 1)."}
    )
    log_va_metrics: bool = field(
        default=False,
        metadata={"help": "Score the counterfactual view under standard OPD too, to log the VA metrics."},
    )

    def __post_init__(self):
        self._choose_device_and_precision()
        super().__post_init__()
        self._resolve_method()
        checks = [
            (self.num_generations >= 1, "num_generations", "must be >= 1"),
            (self.temperature > 0, "temperature", "must be > 0"),
            (self.divergence_temperature > 0, "divergence_temperature", "must be > 0"),
            (0.0 < self.pixelate_ratio <= 1.0, "pixelate_ratio", "must be in (0, 1]"),
            (0.0 < self.va_high_fraction <= 1.0, "va_high_fraction", "must be in (0, 1]"),
            (0.0 <= self.va_high_weight <= 1.0, "va_high_weight", "must be in [0, 1]"),
            (self.va_weight_temperature > 0, "va_weight_temperature", "must be > 0"),
            (self.va_eps > 0, "va_eps", "must be > 0"),
            (
                self.teacher_batch_size is None or self.teacher_batch_size >= 1,
                "teacher_batch_size",
                "must be >= 1 (None: a micro-batch)",
            ),
            (self.vgs_gamma >= 0, "vgs_gamma", "must be >= 0"),
            (self.vgs_lambda >= 0, "vgs_lambda", "must be >= 0"),
            (self.vgs_eta > 0, "vgs_eta", "must be > 0"),
            (0.0 < self.vgs_lp_quantile < 1.0, "vgs_lp_quantile", "must be in (0, 1)"),
            (
                len(self.vgs_adaptive_gamma_quantiles) == 2
                and 0.0 < self.vgs_adaptive_gamma_quantiles[0] < self.vgs_adaptive_gamma_quantiles[1] < 1.0,
                "vgs_adaptive_gamma_quantiles",
                "must be two quantiles 0 < low < high < 1",
            ),
            (0.0 < self.va_token_mask_fraction < 1.0, "va_token_mask_fraction", "must be in (0, 1)"),
            (self.cue_recovery_interval >= 1, "cue_recovery_interval", "must be >= 1"),
            ("{cue}" in self.cue_template, "cue_template", "must contain '{cue}'"),
            (self.kl_estimator in KL_ESTIMATORS, "kl_estimator", f"must be one of {', '.join(KL_ESTIMATORS)}"),
            (0.0 <= self.distillation_weight <= 1.0, "distillation_weight", "must be in [0, 1]"),
            (self.scale_rewards in SCALE_REWARDS, "scale_rewards", f"must be one of {', '.join(SCALE_REWARDS)}"),
            (
                self.loss_type in POLICY_LOSS_TYPES,
                "loss_type",
                f"must be one of {', '.join(POLICY_LOSS_TYPES)} (TRL's 'bnpo' normalises by each micro-batch's "
                "tokens, so the update would depend on the split)",
            ),
            (
                self.loss_aggregation in LOSS_AGGREGATIONS,
                "loss_aggregation",
                f"must be one of {', '.join(LOSS_AGGREGATIONS)}",
            ),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"VAOPDConfig.{name} {rule}, got {getattr(self, name)!r}.")
        if self.counterfactual_view not in VIEW_NAMES:
            raise ValueError(
                f"VAOPDConfig.counterfactual_view must be one of {', '.join(VIEW_NAMES)}, got "
                f"{self.counterfactual_view!r}.{did_you_mean(self.counterfactual_view, VIEW_NAMES)} For a custom view, "
                "pass a callable image -> image as the trainer's `counterfactual_view` argument."
            )
        if self.visual_advantage not in VISUAL_ADVANTAGES:
            raise ValueError(
                f"VAOPDConfig.visual_advantage must be one of {', '.join(VISUAL_ADVANTAGES)}, got "
                f"{self.visual_advantage!r}.{did_you_mean(self.visual_advantage, VISUAL_ADVANTAGES)}"
            )
        if self.visual_advantage != "sampled_token" and not self.needs_counterfactual:
            raise ValueError(
                f"VAOPDConfig.visual_advantage={self.visual_advantage!r} changes the visual advantage, but no component "
                f"of method={self.method!r} uses it (rollout_weighting, token_grouping and vgs off, no va_token_mask, "
                "log_va_metrics off). Turn on a component that uses VA (e.g. method='va_opd'), or drop the setting."
            )
        if self.va_token_mask is not None and self.va_token_mask not in VA_TOKEN_MASKS:
            raise ValueError(
                f"VAOPDConfig.va_token_mask must be one of {', '.join(VA_TOKEN_MASKS)} or None, got "
                f"{self.va_token_mask!r}."
            )
        if self.va_token_mask is not None and self.token_grouping:
            raise ValueError(
                "VAOPDConfig.va_token_mask takes tokens out of each response's mean token KL, which token grouping "
                "replaces: set token_grouping=False (e.g. method='opd', or method='va_opd' with token_grouping=False)."
            )
        if self.kl_estimator == "sampled_token" and (self.vgs or self.beta != 1.0):
            raise ValueError(
                "VAOPDConfig.kl_estimator='sampled_token' estimates the reverse KL from the sampled token alone, but "
                f"{'VGS needs the full-vocabulary terms' if self.vgs else f'beta={self.beta} asks for another divergence'}"
                ". Use kl_estimator='full', or beta=1.0 without VGS."
            )
        if self.vgs and self.beta != 1.0:
            raise ValueError(
                f"VGS's terms are reverse KLs KL(p || .), but VAOPDConfig.beta={self.beta} asks for another divergence. "
                "Set beta=1.0, or turn VGS off."
            )
        if self.use_vllm and self.cue_recovery:
            raise ValueError(
                "VAOPDConfig.use_vllm=True with cue_recovery=True: vLLM would sample the rollouts without the student's "
                "cue-recovery module, so they would be off-policy. Set use_vllm=False (transformers' generate runs "
                "the module), or cue_recovery=False."
            )
        if self.use_vllm:
            # Refused here rather than after both models are loaded: colocated vLLM runs its engine on the training
            # GPUs and server mode syncs weights over NCCL, so both need vLLM and CUDA
            if not is_vllm_available():
                raise ImportError(
                    "VAOPDConfig.use_vllm=True needs vLLM: pip install 'trl_vaopd[vllm]'. Or set use_vllm=False to "
                    "sample rollouts with transformers' generate (the two-view teacher scoring is the same)."
                )
            if self.use_cpu or not torch.cuda.is_available():
                raise ValueError(
                    "VAOPDConfig.use_vllm=True needs CUDA GPUs (vLLM's colocated engine and the server's weight sync "
                    "run on GPU); set use_vllm=False on CPU."
                )
        generation_batch = self.per_device_train_batch_size * self.world_size * self.gradient_accumulation_steps
        if generation_batch % self.num_generations:
            raise ValueError(
                f"The generation batch (per_device_train_batch_size={self.per_device_train_batch_size} x "
                f"{self.world_size} processes x gradient_accumulation_steps={self.gradient_accumulation_steps} = "
                f"{generation_batch} rollouts) must hold whole groups of num_generations={self.num_generations} "
                "siblings. Change one of these so the product is a multiple of num_generations."
            )

    def _choose_device_and_precision(self) -> None:
        """`use_cpu` and `bf16` from the hardware when the user left them unset, as accelerate chooses the device.

        TRL turns `bf16` on when it is not given, which transformers refuses on a machine without a bf16-capable
        accelerator: the same script would need `use_cpu=True, bf16=False` added to run on a laptop.
        """
        if not self.use_cpu and not torch.accelerator.is_available():
            self.use_cpu = True
        if self.bf16 is None and not self.fp16 and (self.use_cpu or not is_torch_bf16_gpu_available()):
            self.bf16 = False
            logger.warning_once(
                "VAOPDConfig: bf16 was not set and this run has no bf16-capable accelerator"
                f"{' (use_cpu=True)' if self.use_cpu else ''}: training in float32. Set bf16 to choose."
            )

    def _resolve_method(self) -> None:
        """Check `method` and fill every component switch left at `None` from the method's preset."""
        if isinstance(self.method, str):
            self.method = [self.method]
        self.method = list(self.method)
        unknown = [name for name in self.method if name not in METHOD_COMPONENTS]
        if unknown or not self.method:
            hints = "".join(did_you_mean(name, METHOD_COMPONENTS) for name in unknown)
            raise ValueError(
                f"VAOPDConfig.method must be one or more of {', '.join(METHOD_COMPONENTS)}, got {self.method!r}."
                + hints
            )
        if len(set(self.method)) != len(self.method):
            raise ValueError(f"VAOPDConfig.method lists a method twice: {self.method!r}.")
        if "opd" in self.method and len(self.method) > 1:
            raise ValueError(
                f"VAOPDConfig.method={self.method!r}: 'opd' is the baseline with every component off, so it cannot be "
                "combined with another method. Drop 'opd' from the list."
            )
        components = frozenset().union(*(METHOD_COMPONENTS[name] for name in self.method))
        for switch in ("rollout_weighting", "token_grouping", "vgs", "use_cues", "cue_recovery"):
            if getattr(self, switch) is None:
                setattr(self, switch, switch in components)
        if self.loss_aggregation is None:
            self.loss_aggregation = "token_mean" if self.method == ["vicur"] else "response_mean"

    @property
    def needs_counterfactual(self) -> bool:
        """Whether the teacher scores the counterfactual view: some component or analysis needs VA or `qbar`."""
        return bool(
            self.rollout_weighting
            or self.token_grouping
            or self.vgs
            or self.va_token_mask is not None
            or self.log_va_metrics
        )
