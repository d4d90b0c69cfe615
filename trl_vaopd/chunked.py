"""Per-token divergence and log-probabilities from hidden states, on TRL's chunked kernels.

Neither function materialises `(N, T, V)` logits: only the valid positions are projected through the output head, on
vocabulary tiles, by `trl.kernels` (Triton on GPU, torch elsewhere). Both return per-token values scattered back to
`(N, T)`, zero on invalid positions, so the caller can weight tokens individually.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl.kernels.chunked_divergence import VOCAB_CHUNK_SIZE, ChunkedDivergenceFunction
from trl.kernels.chunked_logprob import ChunkedLogProbFunction
from trl.trainer.utils import maybe_gather_lm_head_ctx


__all__ = ["OutputHead", "per_token_divergence", "token_logprobs"]


@dataclass(frozen=True)
class OutputHead:
    """A model's output projection and the logit post-processing its config declares.

    Attributes:
        weight: `(V, H)` projection weight.
        bias: `(V,)` projection bias, if any.
        logit_scale: multiplier applied to the logits before any softcapping.
        softcap: Gemma-style `final_logit_softcapping`, if any.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model: torch.nn.Module) -> OutputHead:
        """Read the output head of an (unwrapped) model, resolving the scale conventions TRL's trainer resolves."""
        head = model.get_output_embeddings()
        config = model.config.get_text_config()
        scale = getattr(config, "logit_scale", None)
        for name in ("output_multiplier", "lm_head_multiplier"):
            scale = getattr(config, name, None) if scale is None else scale
        if scale is None and getattr(config, "logits_scaling", None) is not None:
            # Granite and MiniCPM3 divide by `logits_scaling`; HyperCLOVA X multiplies by it
            scaling = config.logits_scaling
            scale = scaling if config.model_type == "hyperclovax" else 1 / scaling
        return cls(
            weight=head.weight,
            bias=head.bias,
            logit_scale=1.0 if scale is None else float(scale),
            softcap=getattr(config, "final_logit_softcapping", None),
        )


def _scatter(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(valid.shape, dtype=values.dtype, device=values.device)
    out[valid] = values
    return out


def per_token_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: OutputHead,
    teacher_head: OutputHead,
    mask: torch.Tensor,
    beta: float = 1.0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token generalized JSD between student and teacher next-token distributions (full vocabulary).

    `beta = 1` gives the reverse KL `KL(p_S || p_T)`, `beta = 0` the forward KL. Gradients flow into
    `student_hidden` and the student head only.

    Args:
        student_hidden: `(N, T, H_s)` student hidden states aligned to the completion tokens.
        teacher_hidden: `(N, T, H_t)` teacher hidden states aligned to the same tokens.
        student_head, teacher_head: the two output heads (same vocabulary).
        mask: `(N, T)` valid-token mask.
        beta: divergence interpolation coefficient.
        temperature: softmax temperature of both distributions.

    Returns:
        `(N, T)` per-token divergence and `(N, T)` per-token student entropy (detached), zero where `mask` is 0.
    """
    valid = mask.bool()
    h_s = student_hidden[valid]
    h_t = teacher_hidden[valid].to(h_s.device)
    divergence, entropy = ChunkedDivergenceFunction.apply(
        h_s,
        student_head.weight,
        student_head.bias,
        h_t,
        teacher_head.weight,
        teacher_head.bias,
        beta,
        temperature,
        student_head.logit_scale,
        student_head.softcap,
        teacher_head.logit_scale,
        teacher_head.softcap,
    )
    return _scatter(divergence, valid), _scatter(entropy.detach(), valid)


@torch.no_grad()
def token_logprobs(
    hidden: torch.Tensor, head: OutputHead, tokens: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probabilities `log p(tokens)` from hidden states, without gradients (teacher scoring).

    Args:
        hidden: `(N, T, H)` hidden states aligned to `tokens` (position t predicts token t).
        head: the model's output head.
        tokens: `(N, T)` token ids.
        mask: `(N, T)` valid-token mask.
        temperature: softmax temperature.

    Returns:
        `(N, T)` float32 log-probabilities, zero where `mask` is 0.
    """
    valid = mask.bool()
    # Under ZeRO-3 the head is sharded and read directly here, outside its module's forward
    with maybe_gather_lm_head_ctx(head.weight, head.bias):
        logprobs = ChunkedLogProbFunction.apply(
            hidden[valid],
            head.weight,
            head.bias,
            tokens[valid].to(hidden.device),
            temperature,
            VOCAB_CHUNK_SIZE,
            head.softcap,
            head.logit_scale,
            (),
        )[0]
    return _scatter(logprobs.float(), valid)
