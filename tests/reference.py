"""An independent float64 reference of the objectives over a whole generation batch of the tiny Qwen3-VL models.

It shares nothing with the trainer's scoring path: full `.logits` of float64 models, one rollout at a time, the images
and their counterfactual views rebuilt here from the dataset's images (`conftest.noise_image`), the text-only prompt
of the "drop" view tokenized here, sibling groups by picture. The teacher's privileged prompt (ViCuR's cue) is
written here too. The per-token objective math comes from `trl_vaopd.objective`, whose functions the analytic tests
pin down (the specifications' worked examples).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from conftest import noise_image, question

from trl_vaopd.objective import (
    adaptive_gamma,
    lp_mask,
    rollout_weights,
    sampled_token_kl,
    token_coefficients,
    token_mean_coefficients,
    uniform_rollout_weights,
    vgs_loss,
    vgs_token_loss,
    vgs_token_terms,
    view_kl_advantage,
    visual_advantage,
)
from trl_vaopd.views import get_view


@dataclass
class Rollout:
    """One rollout: its valid prompt and completion ids, the picture of its prompt, and where the trainer held it."""

    prompt: torch.Tensor
    completion: torch.Tensor
    picture: int
    index: int = 0
    rank: int = 0


def rollouts_of(batches: list[dict], tokenizer, rank: int = 0) -> list[Rollout]:
    """The rollouts of batches holding `prompt_ids`, `prompt_mask`, `completion_ids`, `completion_mask`, in order."""
    rows = []
    for batch in batches:
        for i, (p, pm, c, cm) in enumerate(
            zip(
                batch["prompt_ids"],
                batch["prompt_mask"],
                batch["completion_ids"],
                batch["completion_mask"],
                strict=True,
            )
        ):
            prompt = p[pm.bool()].cpu()
            picture = int(re.search(r"picture (\d+)", tokenizer.decode(prompt)).group(1))
            rows.append(Rollout(prompt, c[cm.bool()].cpu(), picture, i, rank))
    return rows


def rollout_key(row: Rollout) -> tuple:
    """What identifies a rollout wherever the trainer moved it: its prompt and completion tokens."""
    return tuple(row.prompt.tolist()), tuple(row.completion.tolist())


def _logits(model, processor, row: Rollout, view: str, pixelate_ratio: float, text: str) -> torch.Tensor:
    """`(n, V)` float64 logits predicting the row's completion tokens after the user turn `text` under `view`
    ("original" or a view name), over the tokenizer's vocabulary (a padded head's extra rows are no token)."""
    image = noise_image(row.picture)
    content = [{"type": "text", "text": text}]
    if view != "drop":
        image = image if view == "original" else get_view(view, pixelate_ratio)(image)
        content = [{"type": "image", "image": image}, *content]
    encoded = processor.apply_chat_template(
        [[{"role": "user", "content": content}]], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    prompt = torch.tensor(encoded["input_ids"][0])
    ids = torch.cat([prompt, row.completion]).unsqueeze(0)
    vision = {}
    if view != "drop":
        image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        vision = {
            "pixel_values": encoded["pixel_values"].double(),
            "image_grid_thw": encoded["image_grid_thw"],
            "mm_token_type_ids": (ids == image_token).long(),
        }
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **vision)
    start = prompt.numel() - 1
    return out.logits[0, start : start + row.completion.numel(), : len(processor.tokenizer)].double()


def _stack(rows: list[Rollout], values: list[torch.Tensor]) -> torch.Tensor:
    """Per-row `(n_i, ...)` values, right-padded with zeros into `(N, T, ...)`."""
    width = max(row.completion.numel() for row in rows)
    out = values[0].new_zeros((len(rows), width, *values[0].shape[1:]))
    for i, value in enumerate(values):
        out[i, : value.size(0)] = value
    return out


def grpo_reference(rows: list[Rollout], student_logits: torch.Tensor, mask: torch.Tensor, args, reward_of) -> dict:
    """TRL GRPO's loss on these rollouts, from TRL's definitions (one optimizer step per generation batch, so the
    probability ratio is 1 with the gradient of `log p`): rewards `reward_of(completion tokens)`, advantages relative
    to the rollouts of the same picture, the aggregation of `args.loss_type`."""
    rewards = torch.tensor([float(reward_of(row.completion)) for row in rows], dtype=torch.float64)
    advantages = torch.empty_like(rewards)
    for picture in {row.picture for row in rows}:
        members = torch.tensor([row.picture == picture for row in rows])
        group = rewards[members]
        centred = group - group.mean()
        spread = {"group": group.std(), "batch": rewards.std(), "none": None}[args.scale_rewards]
        advantages[members] = centred if spread is None else centred / (spread + 1e-4)
    completions = _stack(rows, [row.completion for row in rows])
    logp = torch.log_softmax(student_logits / args.temperature, -1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)
    per_token = -advantages.unsqueeze(1) * torch.exp(logp - logp.detach()) * mask
    if args.loss_type == "dapo":
        loss = per_token.sum() / mask.sum()
    elif args.loss_type == "grpo":
        loss = (per_token.sum(1) / mask.sum(1)).mean()
    else:  # dr_grpo
        loss = per_token.sum() / (len(rows) * args.max_completion_length)
    return {"rewards": rewards, "advantages": advantages, "loss": loss}


def reference(
    rows: list[Rollout],
    student,
    teacher,
    processor,
    args,
    cues: dict[int, str] | None = None,
    va=None,
    reward_of=None,
) -> dict:
    """VA-OPD's (and VGS's) quantities and loss `L` for `args` (docs/methods/), over the rollouts `rows` (the whole
    batch). The visual advantage is the one `args.visual_advantage` names: the teacher's log-probability gap of the
    sampled token between its two views, or its `KL(q || qbar)` between them.

    With `cues` (picture -> cue), the teacher reads the question followed by `"\n[Hint]: <cue>"` in every view. With
    `reward_of` (completion tokens -> reward), the loss mixes in GRPO's (`grpo_reference`) by `distillation_weight`.
    With `va` (`(N, T)`, a run's own visual advantages, compared with the reference's at float32 tolerance
    elsewhere), the rollout weights and coefficients come from it: the weights' z-scores divide by the spread of the
    siblings' mean VA, which on tiny models is small enough to turn float32 rounding of VA into visible differences.
    `student` and `teacher` are converted to float64 in place; the returned `loss` carries the student's gradient.
    """
    student, teacher = student.double(), teacher.double()
    view = args.counterfactual_view
    mask = _stack(rows, [torch.ones(row.completion.numel(), dtype=torch.long) for row in rows])
    completions = _stack(rows, [row.completion for row in rows])
    for row in rows:  # the student's prompt as the trainer tokenized it is the question with the image
        encoded = processor.apply_chat_template(
            [
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": noise_image(row.picture)},
                            {"type": "text", "text": question(row.picture)},
                        ],
                    }
                ]
            ],
            add_generation_prompt=True,
            tokenize=True,
        )
        assert encoded[0] == row.prompt.tolist()

    def logits(model, name):
        def text(row):
            hint = f"\n[Hint]: {cues[row.picture]}" if cues is not None and model is teacher else ""
            return question(row.picture) + hint

        return _stack(rows, [_logits(model, processor, row, name, args.pixelate_ratio, text(row)) for row in rows])

    def token_logp(lg):
        return torch.log_softmax(lg, -1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)

    with torch.no_grad():
        teacher_logits, teacher_cf_logits = logits(teacher, "original"), logits(teacher, view)
    if getattr(args, "visual_advantage", "sampled_token") == "teacher_view_kl":
        # KL(q || qbar) of the teacher's two views, from their full distributions
        log_q, log_qbar = torch.log_softmax(teacher_logits, -1), torch.log_softmax(teacher_cf_logits, -1)
        reference_va = view_kl_advantage((log_q.exp() * (log_q - log_qbar)).sum(-1), mask)
    else:
        reference_va = visual_advantage(token_logp(teacher_logits), token_logp(teacher_cf_logits), mask)
    va = reference_va if va is None else va.double()
    groups = [row.picture for row in rows]
    if args.rollout_weighting:
        weights = rollout_weights(va.sum(1) / mask.sum(1), groups, args.va_weight_temperature, args.va_eps)
    else:
        weights = uniform_rollout_weights(groups)
    coefficients = token_coefficients(
        va, mask, weights, args.va_high_fraction, args.va_high_weight, group_tokens=args.token_grouping
    )
    if getattr(args, "loss_aggregation", "response_mean") == "token_mean":
        coefficients = token_mean_coefficients(coefficients, mask, len(rows), int(mask.sum()))
    num_prompts = len(set(groups))
    student_logits = logits(student, "original")
    out = {"rows": rows, "va": reference_va, "mask": mask, "weights": weights, "coefficients": coefficients}
    if args.vgs:
        terms = vgs_token_terms(student_logits, logits(student, view), teacher_logits, teacher_cf_logits, mask)
        lp = lp_mask(terms.vds, mask, args.vgs_lp_quantile)
        if args.vgs_adaptive_gamma:
            gamma = adaptive_gamma(terms.vds, mask, args.vgs_gamma, args.vgs_adaptive_gamma_quantiles)
        else:
            gamma = args.vgs_gamma * mask.double()
        token_loss = vgs_token_loss(terms.standard, terms.visual, terms.language, gamma, lp, args.vgs_lambda)
        out.update(terms=terms, lp=lp, gamma=gamma, loss=vgs_loss(token_loss, coefficients, num_prompts, args.vgs_eta))
    elif getattr(args, "kl_estimator", "full") == "sampled_token":
        kl = sampled_token_kl(token_logp(student_logits), token_logp(teacher_logits), mask)
        out["loss"] = (coefficients * kl).sum() / num_prompts
    else:
        log_ps, log_pt = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
        kl = (log_ps.exp() * (log_ps - log_pt)).sum(-1) * mask
        out["loss"] = (coefficients * kl).sum() / num_prompts
    if reward_of is not None:
        out["grpo"] = grpo_reference(rows, student_logits, mask, args, reward_of)
        weight = args.distillation_weight
        out["distillation_loss"] = out["loss"]
        out["loss"] = weight * out["loss"] + (1 - weight) * out["grpo"]["loss"]
    return out
