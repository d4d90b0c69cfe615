"""Where the KL of on-policy distillation sits, on the starting student's own rollouts: the task's regime.

The papers' premise is that the few image-dependent tokens carry little of the KL: in long reasoning traces the text
tokens carry most of it, and the visual signal drowns among them. `kl_va_alignment` measures that regime on fresh
rollouts of a student: how much of the KL mass sits on the tokens that depend on the image (every number in these
tasks' answers depends on the image), and how many tokens those are.

VA (`docs/methods/va_opd.md`, "Visual advantage") is measured on the *sampled* token: it is large where the student
sampled a token that the teacher supports only with the image. The KL at a position compares full distributions, so
it is large where the student is wrong. `kl_va_alignment` measures both on fresh rollouts of a student, per token,
and reports how much of the KL mass the 10% highest-VA, 10% lowest-VA and 10% random tokens of each response hold
(the three KL masks of the replication), how much sits on the numbers read off the figure, and VA and KL at the
width token when the student's width is right and when it is wrong.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from trl_vaopd.demo.experiment import score_views
from trl_vaopd.demo.models import DemoModels, _Encoder, completion_logits, generate
from trl_vaopd.demo.regime import number_token_ids


__all__ = ["kl_va_alignment"]


@torch.no_grad()
def kl_va_alignment(
    models: DemoModels,
    student=None,
    num_items: int = 64,
    samples: int = 4,
    temperature: float = 0.7,
    seed: int = 0,
) -> dict[str, Any]:
    """KL-vs-VA statistics on `samples` rollouts per validation item of `student` (the cached student by default)."""
    task = models.setup.task
    processor = models.processor()
    teacher = models.teacher()
    student = student if student is not None else models.student()
    encoder = _Encoder(processor, task)
    tokenizer = processor.tokenizer
    items = models.validation_items[:num_items]
    generator = torch.Generator().manual_seed(seed)
    totals = {"kl": 0.0, "top": 0.0, "low": 0.0, "random": 0.0, "numbers": 0.0, "tokens": 0, "number_tokens": 0}
    width = {"right": {"va": [], "kl": []}, "wrong": {"va": [], "kl": []}}
    number_ids = number_token_ids(tokenizer)
    for chunk, _, completion in generate(
        student, processor, items, task, temperature=temperature, num_samples=samples, seed=seed, return_ids=True
    ):
        scores = score_views(teacher, processor, chunk, completion, task)
        mask = scores["mask"].bool()
        va = (scores["logp_original"] - scores["logp_pixelated"]).clamp(min=0) * mask
        log_pt = torch.log_softmax(completion_logits(teacher, encoder, chunk, completion, "original"), -1)
        log_ps = torch.log_softmax(completion_logits(student, encoder, chunk, completion, "original"), -1)
        kl = ((log_ps.exp() * (log_ps - log_pt)).sum(-1) * mask).clamp(min=0)
        for row in range(completion.size(0)):
            valid = mask[row].nonzero().squeeze(1)
            n = valid.numel()
            if n == 0:
                continue
            k = max(1, math.ceil(0.1 * n - 1e-9))
            row_va, row_kl = va[row, valid], kl[row, valid]
            # Ties broken at random, as the trainer's `va_token_mask` does
            shuffle = torch.randperm(n, generator=generator)
            top = shuffle[torch.sort(row_va[shuffle], descending=True, stable=True).indices[:k]]
            low = shuffle[torch.sort(row_va[shuffle], stable=True).indices[:k]]
            totals["kl"] += row_kl.sum().item()
            totals["top"] += row_kl[top].sum().item()
            totals["low"] += row_kl[low].sum().item()
            totals["random"] += row_kl[torch.randperm(n, generator=generator)[:k]].sum().item()
            tokens = completion[row, valid].tolist()
            numbers = [i for i, t in enumerate(tokens) if t in number_ids]
            totals["numbers"] += row_kl[numbers].sum().item() if numbers else 0.0
            totals["tokens"] += n
            totals["number_tokens"] += len(numbers)
            if numbers:
                first = numbers[0]  # the stated width
                stated = tokenizer.decode([tokens[first]]).strip()
                key = "right" if stated == str(chunk[row].width) else "wrong"
                width[key]["va"].append(row_va[first].item())
                width[key]["kl"].append(row_kl[first].item())

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    total = max(totals["kl"], 1e-12)
    return {
        "rollouts": num_items * samples,
        "temperature": temperature,
        "kl_share_top10_va": totals["top"] / total,
        "kl_share_low10_va": totals["low"] / total,
        "kl_share_random10": totals["random"] / total,
        # The regime: the share of the KL on the image-dependent tokens (the numbers), and their share of the tokens
        "kl_share_numbers": totals["numbers"] / total,
        "number_token_share": totals["number_tokens"] / max(1, totals["tokens"]),
        "mean_kl_per_token": totals["kl"] / max(1, totals["tokens"]),
        "width_right": {
            "count": len(width["right"]["va"]),
            "va": mean(width["right"]["va"]),
            "kl": mean(width["right"]["kl"]),
        },
        "width_wrong": {
            "count": len(width["wrong"]["va"]),
            "va": mean(width["wrong"]["va"]),
            "kl": mean(width["wrong"]["kl"]),
        },
    }
