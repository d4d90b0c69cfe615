"""`VAOPDConfig`: TRL's `DistillationConfig` plus the VA-OPD settings, with the paper's recipe as defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import DistillationConfig
from trl.import_utils import is_vllm_available

from .views import VIEW_NAMES


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
        rollout_weighting (`bool`, *optional*, defaults to `True`):
            Whether to weight sibling rollouts by their relative mean VA. Off: uniform weights `1 / K`.
        token_grouping (`bool`, *optional*, defaults to `True`):
            Whether to average the KL separately over the high- and low-VA token groups. Off: the mean token KL of each
            response. With both switches off the objective is standard OPD (mean token KL per response, mean over
            responses).

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
    rollout_weighting: bool = field(
        default=True,
        metadata={"help": "Whether to weight sibling rollouts by their relative mean VA (off: uniform 1/K)."},
    )
    token_grouping: bool = field(
        default=True,
        metadata={"help": "Whether to average the KL separately over the high- and low-VA token groups."},
    )

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (self.num_generations >= 1, "num_generations", "must be >= 1"),
            (self.temperature > 0, "temperature", "must be > 0"),
            (self.divergence_temperature > 0, "divergence_temperature", "must be > 0"),
            (0.0 < self.pixelate_ratio <= 1.0, "pixelate_ratio", "must be in (0, 1]"),
            (0.0 < self.va_high_fraction <= 1.0, "va_high_fraction", "must be in (0, 1]"),
            (0.0 <= self.va_high_weight <= 1.0, "va_high_weight", "must be in [0, 1]"),
            (self.va_weight_temperature > 0, "va_weight_temperature", "must be > 0"),
            (self.va_eps > 0, "va_eps", "must be > 0"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"VAOPDConfig.{name} {rule}, got {getattr(self, name)!r}.")
        if self.counterfactual_view not in VIEW_NAMES:
            raise ValueError(
                f"VAOPDConfig.counterfactual_view must be one of {', '.join(VIEW_NAMES)}, got "
                f"{self.counterfactual_view!r}. For a custom view, pass a callable image -> image as the trainer's "
                "`counterfactual_view` argument."
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
