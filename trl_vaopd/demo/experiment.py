"""One on-policy distillation run on the demo task, shared by the demo and the replication.

`run_distillation(models, method, seed, steps)` distils the cached student from the cached teacher with
`VAOPDTrainer` under one of these objectives, all with the same rollouts per step, steps and optimiser:

| method           | `VAOPDConfig` settings                                 | what the loss is                            |
|------------------|--------------------------------------------------------|---------------------------------------------|
| `opd`            | `method="opd"`                                         | standard OPD (`docs/methods/va_opd.md`)     |
| `vaopd`          | `method="va_opd"`                                      | VA-OPD: rollout weighting + token grouping  |
| `vaopd_view_kl`  | `method="va_opd", visual_advantage="teacher_view_kl"`  | VA-OPD on the package's own VA variant      |
| `weighting_only` | `method="va_opd", token_grouping=False`                | rollout weighting alone                     |
| `grouping_only`  | `method="va_opd", rollout_weighting=False`             | token grouping alone                        |
| `mask_top10`     | `method="opd", va_token_mask="top"`                    | OPD without the 10% highest-VA tokens       |
| `mask_low10`     | `method="opd", va_token_mask="low"`                    | OPD without the 10% lowest-VA tokens        |
| `mask_random10`  | `method="opd", va_token_mask="random"`                 | OPD without 10% random tokens               |
| `vgs`            | `method="vgs", counterfactual_view="drop"`             | VGS as its paper runs it (no image)         |
| `vaopd_vgs`      | `method=["va_opd", "vgs"]`                             | VGS weighted by VA-OPD's coefficients       |
| `vicur_cue`      | `method="vicur", cue_recovery=False`                   | OPD to the teacher reading the item's cue   |
| `vicur`          | `method="vicur"`                                       | the cue teacher + the cue-recovery module   |
| `vicur_vaopd`    | `method=["va_opd", "vicur"]`                           | VA-OPD with the cue teacher and the module  |
| `grpo`           | `method="opd", distillation_weight=0.0` + accuracy     | GRPO alone on the answer's accuracy         |
| `opd_grpo`       | `method="opd", distillation_weight=0.3` + accuracy     | 0.7 GRPO + 0.3 OPD                          |
| `vgs_grpo`       | `method="vgs", ..., distillation_weight=0.3` + accuracy | 0.7 GRPO + 0.3 VGS, the VGS paper's mix     |

Every run scores the counterfactual view (`log_va_metrics=True`), so the VA metrics exist for every method.

Along the run, every `eval_every` steps, the student is evaluated on a fixed probe set of validation items: greedy
accuracy, and its own visual reliance, the mean per-token gap `log p_S(y_t | v) - log p_S(y_t | v~)` between the
original and the pixelated image on responses it samples at temperature 1. At the end: greedy accuracy and avg@8 at
temperature 1 on the held-out test set (skipped with `evaluate_test=False`, for runs that choose a setting and must
not read the test figures).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import TrainerCallback

from ..config import VAOPDConfig
from ..trainer import VAOPDTrainer
from .models import (
    DemoModels,
    _Encoder,
    completion_logits,
    evaluate,
    generate,
    suppressed_token_ids,
    valid_token_mask,
)
from .task import DEFAULT_TASK, RectangleItem, TaskConfig, build_dataset


__all__ = [
    "METHODS",
    "DistillSpec",
    "run_distillation",
    "score_views",
    "visual_reliance",
]

#: method -> the `VAOPDConfig` settings that select it
METHODS: dict[str, dict[str, Any]] = {
    "opd": {"method": "opd"},
    "vaopd": {"method": "va_opd"},
    # The package's own VA variant (the teacher's view divergence; docs/methods/va_opd.md), not a paper's method
    "vaopd_view_kl": {"method": "va_opd", "visual_advantage": "teacher_view_kl"},
    "weighting_only": {"method": "va_opd", "token_grouping": False},
    "grouping_only": {"method": "va_opd", "rollout_weighting": False},
    "mask_top10": {"method": "opd", "va_token_mask": "top"},
    "mask_low10": {"method": "opd", "va_token_mask": "low"},
    "mask_random10": {"method": "opd", "va_token_mask": "random"},
    "vgs": {"method": "vgs", "counterfactual_view": "drop"},
    "vaopd_vgs": {"method": ["va_opd", "vgs"]},
    "vicur_cue": {"method": "vicur", "cue_recovery": False},
    "vicur": {"method": "vicur"},
    "vicur_vaopd": {"method": ["va_opd", "vicur"]},
    # The answer's accuracy as a verifiable reward (`reward_funcs`, the trainer's argument; the rest is VAOPDConfig)
    "grpo": {"method": "opd", "distillation_weight": 0.0, "reward_funcs": "accuracy"},
    "opd_grpo": {"method": "opd", "distillation_weight": 0.3, "reward_funcs": "accuracy"},
    "vgs_grpo": {
        "method": "vgs",
        "counterfactual_view": "drop",
        "distillation_weight": 0.3,
        "reward_funcs": "accuracy",
    },
}


@dataclass(frozen=True)
class DistillSpec:
    """Budget and optimiser of a distillation run (the same for every method)."""

    steps: int = 150
    prompts_per_step: int = 8
    num_generations: int = 4
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.05
    temperature: float = 0.7
    top_p: float = 0.95
    max_completion_length: int | None = None  # the task's `max_answer_tokens` when None
    eval_every: int = 25
    probe_size: int = 64
    final_samples: int = 8


# ---------------------------------------------------------------------------------------------------------------------
# Two-view scoring of sampled responses (teacher VA for the heatmap, student visual reliance)
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def score_views(
    model, processor, items: Sequence[RectangleItem], completions: torch.Tensor, task: TaskConfig = DEFAULT_TASK
) -> dict[str, torch.Tensor]:
    """Log-probs of `completions` (`(N, T)` ids, padded after the first EOS) under the original and pixelated images.

    Returns `logp_original`, `logp_pixelated` and `mask` (valid tokens: up to and including the first EOS), `(N, T)`.
    """
    encoder = _Encoder(processor, task)
    mask = valid_token_mask(completions, (encoder.eos_id, encoder.pad_id))
    out = {}
    for view in ("original", "pixelated"):
        logits = completion_logits(
            model, encoder, items, completions, "original" if view == "original" else "pixelate", mask
        )
        logp = torch.log_softmax(logits, dim=-1)
        out[f"logp_{view}"] = logp.gather(-1, completions.unsqueeze(-1)).squeeze(-1) * mask
    out["mask"] = mask
    return out


def visual_reliance(
    model, processor, items: Sequence[RectangleItem], task: TaskConfig = DEFAULT_TASK, seed: int = 0
) -> float:
    """The model's mean per-token log-prob gap, original minus pixelated image, on responses it samples at
    temperature 1 (one per item)."""
    total, count = 0.0, 0
    for chunk, _, completion in generate(model, processor, items, task, temperature=1.0, seed=seed, return_ids=True):
        scores = score_views(model, processor, chunk, completion, task)
        gap = (scores["logp_original"] - scores["logp_pixelated"]) * scores["mask"]
        total += gap.sum().item()
        count += int(scores["mask"].sum())
    return total / max(1, count)


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


class _Probe(TrainerCallback):
    """Evaluates the student on the probe set every `every` steps and drives an optional progress bar."""

    def __init__(self, run: _Run, every: int, bar=None):
        self.run, self.every, self.bar = run, every, bar

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0 and state.global_step < state.max_steps:
            self.run.probe(model, state.global_step)
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            postfix = {"loss": f"{logs['loss']:.3f}"}
            if logs.get("va/mean") is not None:
                postfix["va"] = f"{logs['va/mean']:.3f}"
            if self.run.curve:
                postfix["acc"] = f"{self.run.curve[-1]['accuracy']:.0%}"
            self.bar.set_postfix(postfix)


class _Run:
    def __init__(self, models: DemoModels, processor, probe_items, seed: int):
        self.models, self.processor, self.probe_items, self.seed = models, processor, probe_items, seed
        self.curve: list[dict[str, float]] = []

    def probe(self, model, step: int) -> None:
        task = self.models.setup.task
        accuracy = evaluate(model, self.processor, self.probe_items, task)["greedy"]
        reliance = visual_reliance(model, self.processor, self.probe_items, task, seed=self.seed + step)
        self.curve.append({"step": step, "accuracy": accuracy, "visual_reliance": reliance})


def run_distillation(
    models: DemoModels,
    method: str = "vaopd",
    seed: int = 0,
    spec: DistillSpec = DistillSpec(),
    output_dir: str = "vaopd_demo/run",
    progress: bool = True,
    keep_trainer: bool = False,
    evaluate_test: bool = True,
) -> dict[str, Any]:
    """Distil the cached student from the cached teacher with `method` (see `METHODS`); returns the measurements.

    With `evaluate_test=False` the held-out test figures are never read (`result["final"]` is `None`): the run's
    measurements are the probe's, on validation figures, as a learning-rate search needs.

    The seed sets the training prompts and their order, the sampling and the random mask: two methods at the same seed
    see the same prompts in the same order, with the same number of rollouts and steps. The student always starts from
    the same cached checkpoint.
    """
    from tqdm.auto import tqdm
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {list(METHODS)}")
    task = models.setup.task
    processor = models.processor()
    teacher, student = models.teacher(), models.student()
    # Training prompts: the task's training items, in a seed-dependent order (the trainer's sampler shuffles too)
    generator = torch.Generator().manual_seed(10_000 + seed)
    n_rows = spec.steps * spec.prompts_per_step
    order = torch.randint(len(models.train_items), (n_rows,), generator=generator).tolist()
    train_dataset = build_dataset([models.train_items[i] for i in order], task)
    probe_items = models.validation_items[: spec.probe_size]
    run = _Run(models, processor, probe_items, seed)
    settings = dict(METHODS[method])
    reward_funcs = settings.pop("reward_funcs", None)

    args = VAOPDConfig(
        output_dir=output_dir,
        max_steps=spec.steps,
        per_device_train_batch_size=spec.prompts_per_step * spec.num_generations,
        gradient_accumulation_steps=1,
        num_generations=spec.num_generations,
        max_completion_length=spec.max_completion_length or task.max_answer_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=spec.warmup_ratio,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.1,
        max_grad_norm=1.0,
        **settings,
        log_va_metrics=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
        generation_kwargs={"suppress_tokens": suppressed_token_ids(processor.tokenizer)},
    )
    trainer = VAOPDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=train_dataset,
        processing_class=processor,
        reward_funcs=reward_funcs,
    )
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    bar = tqdm(total=spec.steps, desc=f"{method} (seed {seed})", disable=not progress, leave=False)
    trainer.add_callback(_Probe(run, spec.eval_every, bar))

    start = time.perf_counter()
    run.probe(trainer.model, 0)
    trainer.train()
    train_seconds = time.perf_counter() - start
    bar.close()
    model = trainer.model
    run.probe(model, spec.steps)
    final = (
        evaluate(model, processor, models.test_items, task, samples=spec.final_samples, seed=seed)
        if evaluate_test
        else None
    )

    history = [entry for entry in trainer.state.log_history if "loss" in entry]

    def series(key: str) -> list[float | None]:
        return [entry.get(key) for entry in history]

    def mean(key: str) -> float | None:
        values = [v for v in series(key) if v is not None and not math.isnan(v)]
        return sum(values) / len(values) if values else None

    result = {
        "method": method,
        "seed": seed,
        "spec": asdict(spec),
        "final": final,
        "curve": run.curve,
        "train_seconds": round(train_seconds, 1),
        "history": {
            "step": [entry["step"] for entry in history],
            **{
                k: series(k)
                for k in ("loss", "va/mean", "va/top10_share", "va/high_group_share", "kl/high", "kl/low", "reward")
            },
        },
        "va_mean": mean("va/mean"),
        "va_top10_share": mean("va/top10_share"),
    }
    if args.va_token_mask is not None:
        result["masked_va_share"] = mean("mask/va_share")
    if keep_trainer:
        result["trainer"] = trainer
    return result
