"""The regime at the start of distillation: where the KL sits, and what VGS's counterfactual terms look like.

`measure_regime(models)` samples the cached student's own rollouts on validation items (held out from every training
step; the items and sampling of the replication's regime paragraph) before any distillation step, and scores them
per token with the four next-token distributions of VGS (`docs/methods/vgs.md`): the student `p` and the teacher `q`
with the figure, the student `pbar` and the teacher `qbar` under a counterfactual view (the "drop" view, no image in
the prompt, as the VGS paper and the replication's VGS runs use, and the "pixelate" view), and the visual target
`q* = softmax(log pbar + log q - log qbar)`. It reports the mean per token of

- `KL(p || q)`, the standard on-policy distillation loss,
- `KL(pbar || qbar)`, VGS's language term, per view,
- `KL(q* || q)`, how far VGS's target moves from the teacher (the trainer's `vgs/target_shift`), per view,

and the share of the `KL(p || q)` mass on the image-dependent tokens (the papers' premise: small in long reasoning
traces). As in the replication's regime paragraph, the image-dependent tokens of a sampled response are its number
tokens: every number in these tasks' answers depends on the figure and no other token does
(`trl_vaopd.demo.task.image_dependent_mask` checks this on the reference answers).

The terms are `trl_vaopd.objective.vgs.vgs_token_terms`, the package's full-vocabulary reference of the trainer's
chunked VGS kernels, on the full-vocabulary logits (the models run in float32, the divergences are taken in float64):
the demo's vocabulary has 1,024 entries, so a batch of 32 responses of at most 96 tokens is 25 MB per distribution.
`python -m trl_vaopd.demo regime --task area [--text_prior]` prints the figures.
"""

from __future__ import annotations

from typing import Any

import torch

from ..objective.vgs import vgs_token_terms
from .models import DemoModels, _Encoder, completion_logits, generate, valid_token_mask


__all__ = ["REGIME_VIEWS", "measure_regime", "number_token_ids"]

#: The counterfactual views the regime is measured under ("drop" is the one the replication's VGS runs use)
REGIME_VIEWS = ("drop", "pixelate")


def number_token_ids(tokenizer) -> set[int]:
    """Ids of the tokens that spell a number (with or without the leading space): the image-dependent tokens of a
    response on the demo's tasks."""
    return {i for token, i in tokenizer.get_vocab().items() if token.lstrip("Ġ").isdigit()}


@torch.no_grad()
def measure_regime(
    models: DemoModels,
    num_items: int = 64,
    samples: int = 4,
    temperature: float = 0.7,
    seed: int = 0,
    views: tuple[str, ...] = REGIME_VIEWS,
    student=None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Per-token KL figures on `samples` rollouts at `temperature` of the student (the cached one unless `student` is
    given) for each of the first `num_items` validation items.

    Returns:
        `{"rollouts", "tokens", "temperature", "kl": mean KL(p||q), "kl_share_image_dependent": share of the KL(p||q)
        mass on the number tokens, "image_dependent_token_share", "views": {view: {"kl_counterfactual": mean
        KL(pbar||qbar), "target_shift": mean KL(q*||q), "vds": mean KL(q||qbar), "target_flip": share of tokens where
        q*'s most likely token is not q's}}}`, every mean over all valid tokens (up to and including each response's
        end of turn).
    """
    unknown = set(views) - {"drop", "pixelate", "empty"}
    if not views or unknown:
        raise ValueError(f"views must be one or more of 'drop', 'pixelate' and 'empty', got {list(views)}.")
    task = models.setup.task
    processor = models.processor()
    teacher = models.teacher()
    student = student if student is not None else models.student()
    encoder = _Encoder(processor, task)
    numbers = torch.tensor(sorted(number_token_ids(processor.tokenizer)))
    items = models.validation_items[:num_items]
    totals = {"kl": 0.0, "kl_numbers": 0.0, "tokens": 0, "number_tokens": 0}
    per_view = {
        view: {"kl_counterfactual": 0.0, "target_shift": 0.0, "vds": 0.0, "target_flip": 0.0} for view in views
    }
    pieces = generate(
        student,
        processor,
        items,
        task,
        temperature=temperature,
        num_samples=samples,
        batch_size=batch_size,
        seed=seed,
        return_ids=True,
    )
    for chunk, _, completion in pieces:
        mask = valid_token_mask(completion, (encoder.eos_id, encoder.pad_id))
        logits = {
            (name, view): completion_logits(model, encoder, chunk, completion, view, mask).double()
            for name, model in (("student", student), ("teacher", teacher))
            for view in ("original", *views)
        }
        for i, view in enumerate(views):
            terms = vgs_token_terms(
                logits["student", "original"],
                logits["student", view],
                logits["teacher", "original"],
                logits["teacher", view],
                mask,
            )
            for key, values in (
                ("kl_counterfactual", terms.language),
                ("target_shift", terms.target_shift),
                ("vds", terms.vds),
                ("target_flip", terms.target_flip),
            ):
                per_view[view][key] += values.sum().item()
            if i == 0:  # KL(p || q) does not depend on the view
                is_number = torch.isin(completion, numbers) & mask.bool()
                totals["kl"] += terms.standard.sum().item()
                totals["kl_numbers"] += terms.standard[is_number].sum().item()
                totals["number_tokens"] += int(is_number.sum())
        totals["tokens"] += int(mask.sum())
    tokens = max(1, totals["tokens"])
    return {
        "rollouts": len(items) * samples,
        "tokens": totals["tokens"],
        "temperature": temperature,
        "kl": totals["kl"] / tokens,
        "kl_share_image_dependent": totals["kl_numbers"] / max(totals["kl"], 1e-300),
        "image_dependent_token_share": totals["number_tokens"] / tokens,
        "views": {view: {key: value / tokens for key, value in figures.items()} for view, figures in per_view.items()},
    }
