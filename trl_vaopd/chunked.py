"""Per-token divergence and log-probabilities from hidden states, on TRL's chunked kernels.

No function here materialises `(N, T, V)` logits: only the valid positions are projected through the output heads.
The divergence and log-probabilities run on `trl.kernels` (vocabulary tiles; Triton on GPU, torch elsewhere); VGS's
four-distribution terms, which no TRL kernel covers, run on token chunks of full-vocabulary rows
(`vgs_divergences`), recomputed in the backward. All return per-token values scattered back to `(N, T)`, zero on
invalid positions, so the caller can weight tokens individually.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from trl.kernels.chunked_divergence import VOCAB_CHUNK_SIZE, ChunkedDivergenceFunction
from trl.kernels.chunked_logprob import ChunkedLogProbFunction
from trl.trainer.utils import maybe_gather_lm_head_ctx


__all__ = ["VGS_TILE_ELEMENTS", "OutputHead", "per_token_divergence", "token_logprobs", "vgs_divergences"]


@dataclass(frozen=True)
class OutputHead:
    """A model's output projection, the logit post-processing its config declares, and the vocabulary compared.

    Attributes:
        weight: `(V, H)` projection weight.
        bias: `(V,)` projection bias, if any.
        logit_scale: multiplier applied to the logits before any softcapping.
        softcap: Gemma-style `final_logit_softcapping`, if any.
        vocab_size: number of leading rows compared with the other model's head, or `None` for all of them. Heads
            padded beyond the tokenizer's vocabulary to different sizes are compared over the tokenizer's tokens.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float = 1.0
    softcap: float | None = None
    vocab_size: int | None = None

    @classmethod
    def of(cls, model: torch.nn.Module, vocab_size: int | None = None) -> OutputHead:
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
            vocab_size=vocab_size,
        )

    @property
    def num_rows(self) -> int:
        """Rows of the full weight (read from DeepSpeed's metadata when ZeRO-3 has partitioned it)."""
        return int(getattr(self.weight, "ds_shape", self.weight.shape)[0])

    @contextmanager
    def gathered(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """The compared rows of the weight and bias, gathered for the block under ZeRO-3.

        Without a `vocab_size` these are the parameters themselves. Sliced rows are views, which keep the gathered
        storage alive until autograd releases them, so a view saved for a backward outside the block still holds the
        full values; under ZeRO-3 they are marked as gathered, so that TRL's kernels do not try to gather them again.
        """
        with maybe_gather_lm_head_ctx(self.weight, self.bias):
            if self.vocab_size is None:
                yield self.weight, self.bias
                return
            rows = [None if p is None else p[: self.vocab_size] for p in (self.weight, self.bias)]
            for view, param in zip(rows, (self.weight, self.bias), strict=True):
                if view is not None and hasattr(param, "ds_status"):
                    view.ds_status = param.ds_status
            yield rows[0], rows[1]


def _at_valid(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Hidden states at the valid positions: `(N, T, H)` aligned ones are selected, `(M, H)` packed ones (the valid
    positions only, in row order, as the trainer keeps the teacher's) are taken as they are."""
    return hidden[valid] if hidden.dim() == 3 else hidden


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
        teacher_hidden: `(N, T, H_t)` teacher hidden states aligned to the same tokens, or `(M, H_t)` at the valid
            positions only.
        student_head, teacher_head: the two output heads (same compared vocabulary).
        mask: `(N, T)` valid-token mask.
        beta: divergence interpolation coefficient.
        temperature: softmax temperature of both distributions.

    Returns:
        `(N, T)` per-token divergence and `(N, T)` per-token student entropy (detached), zero where `mask` is 0.
    """
    valid = mask.bool()
    h_s = student_hidden[valid]
    h_t = _at_valid(teacher_hidden, valid).to(h_s.device)
    with student_head.gathered() as (s_weight, s_bias), teacher_head.gathered() as (t_weight, t_bias):
        divergence, entropy = ChunkedDivergenceFunction.apply(
            h_s,
            s_weight,
            s_bias,
            h_t,
            t_weight,
            t_bias,
            beta,
            temperature,
            student_head.logit_scale,
            student_head.softcap,
            teacher_head.logit_scale,
            teacher_head.softcap,
        )
    return _scatter(divergence, valid), _scatter(entropy.detach(), valid)


def token_logprobs(
    hidden: torch.Tensor,
    head: OutputHead,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities `log p(tokens)` from hidden states (differentiable: wrap teacher scoring in `no_grad`).

    Args:
        hidden: `(N, T, H)` hidden states aligned to `tokens` (position t predicts token t).
        head: the model's output head.
        tokens: `(N, T)` token ids.
        mask: `(N, T)` valid-token mask.
        temperature: softmax temperature.
        with_entropy: also return the `(N, T)` entropy of each position's distribution (detached).

    Returns:
        `(N, T)` float32 log-probabilities (and entropies), zero where `mask` is 0.
    """
    valid = mask.bool()
    # Under ZeRO-3 the head is sharded and read directly here, outside its module's forward
    with head.gathered() as (weight, bias):
        logprobs, entropy = ChunkedLogProbFunction.apply(
            hidden[valid],
            weight,
            bias,
            tokens[valid].to(hidden.device),
            temperature,
            VOCAB_CHUNK_SIZE,
            head.softcap,
            head.logit_scale,
            ("entropy",) if with_entropy else (),
        )[:2]
    logprobs = _scatter(logprobs.float(), valid)
    return (logprobs, _scatter(entropy.detach().float(), valid)) if with_entropy else logprobs


#: Token chunks of `vgs_divergences` hold at most this many logits per distribution (128 MiB in float32): about 220
#: tokens for a 151k vocabulary, while the tiny test models take every token at once.
VGS_TILE_ELEMENTS = 2**25


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`hidden @ weight.T + bias` in float32, one vocabulary chunk at a time (no float32 copy of the whole head)."""
    out = torch.empty((hidden.size(0), weight.size(0)), dtype=torch.float32, device=hidden.device)
    h = hidden.float()
    for start in range(0, weight.size(0), VOCAB_CHUNK_SIZE):
        end = min(start + VOCAB_CHUNK_SIZE, weight.size(0))
        out[:, start:end] = h @ weight[start:end].float().t()
    return out if bias is None else out.add_(bias.float())


def _log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, head: OutputHead, temperature: float
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Log-probabilities of a head's distribution, and the derivative of its final logits in the raw projection."""
    logits = _project(hidden, weight, bias) * head.logit_scale
    slope: torch.Tensor | float = head.logit_scale / temperature
    if head.softcap is not None:
        capped = torch.tanh(logits / head.softcap)
        logits = head.softcap * capped
        slope = slope * (1 - capped.square())
    return torch.log_softmax(logits / temperature, dim=-1), slope


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _accumulate_grads(grad_logits, hidden, weight, grad_hidden, grad_weight, grad_bias) -> None:
    # `grad_logits` is (n, V_compared); rows of a padded head beyond the compared vocabulary get no gradient. By
    # vocabulary chunk, accumulating in place: neither a float32 copy of the head nor a head-sized product
    h = hidden.float()
    for start in range(0, weight.size(0), VOCAB_CHUNK_SIZE):
        end = min(start + VOCAB_CHUNK_SIZE, weight.size(0))
        grad_hidden.addmm_(grad_logits[:, start:end], weight[start:end].float())
        grad_weight[start:end].addmm_(grad_logits[:, start:end].t(), h)
    if grad_bias is not None:
        grad_bias[: weight.size(0)].add_(grad_logits.sum(dim=0))


class _VGSDivergences(torch.autograd.Function):
    """Per-token `KL(p||q)`, `KL(p||q*)`, `KL(pbar||qbar)`, the student's entropy and the visual target's diagnostics
    (`KL(q*||q)`, whether `q*` and `q` disagree on the most likely token), on token chunks.

    The forward keeps only the per-token values; the backward recomputes each chunk's four distributions and applies
    the analytic gradients `dKL(p||r)/dz_p = p * (log p - log r - KL)` (with `r` fixed: `q*` holds `pbar` detached).
    """

    @staticmethod
    def forward(ctx, h_p, h_pbar, h_q, h_qbar, s_weight, s_bias, t_weight, t_bias, heads, temperature):
        student_head, teacher_head = heads
        n = h_p.size(0)
        standard, visual, language, entropy, shift, flip = (torch.zeros(n, device=h_p.device) for _ in range(6))
        with student_head.gathered() as (sw, sb), teacher_head.gathered() as (tw, tb):
            chunk = max(1, VGS_TILE_ELEMENTS // sw.size(0))
            for start in range(0, n, chunk):
                rows = slice(start, min(start + chunk, n))
                log_p, _ = _log_probs(h_p[rows], sw, sb, student_head, temperature)
                log_pbar, _ = _log_probs(h_pbar[rows], sw, sb, student_head, temperature)
                log_q, _ = _log_probs(h_q[rows], tw, tb, teacher_head, temperature)
                log_qbar, _ = _log_probs(h_qbar[rows], tw, tb, teacher_head, temperature)
                log_q_star = torch.log_softmax(log_pbar + log_q - log_qbar, dim=-1)
                standard[rows] = _kl(log_p, log_q)
                visual[rows] = _kl(log_p, log_q_star)
                language[rows] = _kl(log_pbar, log_qbar)
                entropy[rows] = -(log_p.exp() * log_p).sum(dim=-1)
                shift[rows] = _kl(log_q_star, log_q)
                flip[rows] = (log_q_star.argmax(dim=-1) != log_q.argmax(dim=-1)).float()
        ctx.save_for_backward(h_p, h_pbar, h_q, h_qbar, s_weight, s_bias, t_weight, t_bias, standard, visual, language)
        ctx.heads, ctx.temperature = heads, temperature
        ctx.mark_non_differentiable(entropy, shift, flip)
        ctx.set_materialize_grads(False)
        return standard, visual, language, entropy, shift, flip

    @staticmethod
    def backward(ctx, grad_standard, grad_visual, grad_language, *_):
        h_p, h_pbar, h_q, h_qbar, s_weight, s_bias, t_weight, t_bias, standard, visual, language = ctx.saved_tensors
        student_head, teacher_head = ctx.heads
        n = h_p.size(0)
        zeros = torch.zeros(n, device=h_p.device)
        g_std, g_vis, g_lang = (
            g.float() if g is not None else zeros for g in (grad_standard, grad_visual, grad_language)
        )
        with student_head.gathered() as (sw, sb), teacher_head.gathered() as (tw, tb):
            grad_p = torch.zeros(h_p.shape, dtype=torch.float32, device=h_p.device)
            grad_pbar = torch.zeros(h_pbar.shape, dtype=torch.float32, device=h_p.device)
            grad_weight = torch.zeros(s_weight.shape, dtype=torch.float32, device=sw.device)
            grad_bias = None if s_bias is None else torch.zeros(s_bias.shape, dtype=torch.float32, device=sw.device)
            chunk = max(1, VGS_TILE_ELEMENTS // sw.size(0))
            for start in range(0, n, chunk):
                rows = slice(start, min(start + chunk, n))
                log_p, slope_p = _log_probs(h_p[rows], sw, sb, student_head, ctx.temperature)
                log_pbar, slope_pbar = _log_probs(h_pbar[rows], sw, sb, student_head, ctx.temperature)
                log_q, _ = _log_probs(h_q[rows], tw, tb, teacher_head, ctx.temperature)
                log_qbar, _ = _log_probs(h_qbar[rows], tw, tb, teacher_head, ctx.temperature)
                log_q_star = torch.log_softmax(log_pbar + log_q - log_qbar, dim=-1)
                p, pbar = log_p.exp(), log_pbar.exp()
                d_p = g_std[rows, None] * p * (log_p - log_q - standard[rows, None])
                d_p += g_vis[rows, None] * p * (log_p - log_q_star - visual[rows, None])
                d_pbar = g_lang[rows, None] * pbar * (log_pbar - log_qbar - language[rows, None])
                _accumulate_grads(d_p * slope_p, h_p[rows], sw, grad_p[rows], grad_weight, grad_bias)
                _accumulate_grads(d_pbar * slope_pbar, h_pbar[rows], sw, grad_pbar[rows], grad_weight, grad_bias)
        return (
            grad_p.to(h_p.dtype),
            grad_pbar.to(h_pbar.dtype),
            None,
            None,
            grad_weight.to(s_weight.dtype) if ctx.needs_input_grad[4] else None,
            grad_bias.to(s_bias.dtype) if grad_bias is not None and ctx.needs_input_grad[5] else None,
            None,
            None,
            None,
            None,
        )


def vgs_divergences(
    student_hidden: torch.Tensor,
    student_cf_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_cf_hidden: torch.Tensor,
    student_head: OutputHead,
    teacher_head: OutputHead,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, ...]:
    """VGS's three divergences per token from hidden states, token-chunked (`docs/methods/vgs.md`; reference:
    `trl_vaopd.objective.vgs_token_terms`).

    Gradients flow into both student hidden states and the student head: `KL(p || q)` and `KL(p || q*)` through `p`,
    `KL(pbar || qbar)` through `pbar`; `q*` holds `pbar` detached. The teacher gets none.

    Args:
        student_hidden, student_cf_hidden: `(N, T, H_s)` student hidden states with the image and under the
            counterfactual view, aligned to the same completion tokens.
        teacher_hidden, teacher_cf_hidden: `(N, T, H_t)` the teacher's, likewise, or `(M, H_t)` at the valid
            positions only.
        student_head, teacher_head: the two output heads (same compared vocabulary).
        mask: `(N, T)` valid-token mask.
        temperature: softmax temperature of all four distributions.

    Returns:
        `(N, T)` standard, visual and language terms, the student's entropy, and the visual target's diagnostics
        `KL(q* || q)` and `1[argmax q* != argmax q]` (the last three detached), zero where `mask` is 0.
    """
    valid = mask.bool()
    h_p, h_pbar = student_hidden[valid], student_cf_hidden[valid]
    h_q, h_qbar = _at_valid(teacher_hidden, valid).to(h_p.device), _at_valid(teacher_cf_hidden, valid).to(h_p.device)
    outputs = _VGSDivergences.apply(
        h_p,
        h_pbar,
        h_q,
        h_qbar,
        student_head.weight,
        student_head.bias,
        teacher_head.weight,
        teacher_head.bias,
        (student_head, teacher_head),
        temperature,
    )
    return tuple(_scatter(value, valid) for value in outputs)
