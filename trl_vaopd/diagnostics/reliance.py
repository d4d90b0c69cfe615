"""The student's visual reliance through training: `VisualRelianceCallback` measures it on fresh rollouts (with the
teacher's VA and the accuracy on them) and `plot_reliance_trajectory` draws the trajectory (the paper's Figure 4b)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch
from matplotlib.ticker import MaxNLocator
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin, TrainerCallback

from ..dataset_formats import row_images
from ..evaluation import tokenize_conversations
from .concentration import _pooled_va
from .figures import save_figure
from .scoring import TokenVA, _conversation, _eval_mode, _model_device_dtype, _to_model, _tokenizer, score_many


__all__ = [
    "ACCURACY_KEY",
    "RESPONSE_LENGTH_KEY",
    "STUDENT_RELIANCE_KEY",
    "TEACHER_VA_KEY",
    "VisualRelianceCallback",
    "plot_reliance_trajectory",
]

#: Log keys of [`VisualRelianceCallback`]: the student's mean positive log-prob gap per token on its own rollouts,
#: the teacher's mean VA on the same rollouts, the accuracy of the rollouts and their mean length in tokens.
STUDENT_RELIANCE_KEY = "visual_reliance/student"
TEACHER_VA_KEY = "visual_reliance/teacher_va"
ACCURACY_KEY = "visual_reliance/accuracy"
RESPONSE_LENGTH_KEY = "visual_reliance/response_length"


def _eos_ids(model: PreTrainedModel, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _cut_at_eos(ids: list[int], eos: set[int]) -> list[int]:
    # Valid tokens (`docs/methods/va_opd.md`): up to and including the first EOS; a truncated response keeps all
    for position, token in enumerate(ids):
        if token in eos:
            return ids[: position + 1]
    return ids


class VisualRelianceCallback(TrainerCallback):
    """Track the student's own visual reliance on fresh rollouts through training (the paper's Figure 4b).

    Every `every_n_steps` optimizer steps (and once before training, with `measure_at_start`), the callback samples
    one response from the current student for each row of a small fixed probe set, then measures on these rollouts:

    - `visual_reliance/student`: the student's own mean positive log-prob gap per token between the original image and
      the counterfactual view (the VA formula with the student as scorer), pooled over all rollout tokens;
    - `visual_reliance/teacher_va`: the teacher's mean VA per token on the same rollouts (when a teacher is given);
    - `visual_reliance/accuracy`: `accuracy_fn(probe_rows, responses)` (when given);
    - `visual_reliance/response_length`: the mean rollout length in tokens.

    Each measurement is appended to `trajectory` and reported at the step it was taken: as its own entry of the
    trainer's `state.log_history`, and to every `report_to` backend (TensorBoard, wandb, trackio, ...) through the
    trainer's callbacks' `on_log`, as the trainer reports its own logs. `VAOPDTrainer` connects the callback to itself
    (`bind_trainer`); with another `Trainer`, call `callback.bind_trainer(trainer)` (unbound, the measurements reach
    `state.log_history` only). The trainer's own metrics, which it averages between its logging steps, are left
    alone.

    Sampling runs under `torch.no_grad()` in eval mode, restores the model's mode afterwards, and uses a forked RNG
    seeded with `seed` at every measurement: the same random stream each time (less noise between measurements), and
    the training's random state is left untouched, so training is identical with or without the callback. Every
    process measures the same probe set.

    Args:
        processor: the student's processor (teacher and student share the vocabulary, as distillation requires).
        probe_rows: the fixed probe set: mappings with `"prompt"` (question string or conversation) and `"images"` or
            `"image"`, e.g. rows of a VA-OPD dataset (`dataset.select(range(8))`); other columns (such as `"answer"`)
            are passed on to `accuracy_fn`.
        teacher: the teacher model, for the teacher-scored VA; `None` skips it.
        every_n_steps: measurement period in optimizer steps.
        accuracy_fn: optional `accuracy_fn(probe_rows, responses) -> float`, with the decoded responses (special
            tokens removed), e.g. built on `trl_vaopd.evaluation.answers_match`.
        view, pixelate_ratio, temperature: counterfactual view and probability temperature of the scoring, as in
            [`score_many`]; use the trainer's `counterfactual_view`, `pixelate_ratio` and `divergence_temperature`.
        max_new_tokens, sampling_temperature, top_p: sampling of the probe rollouts; the trainer's
            `max_completion_length`, `temperature` and `top_p` measure what training sees.
        batch_size: rows per generation and scoring call.
        seed: seed of the probe rollouts.
        measure_at_start: also measure before the first step (step 0 of the trajectory).
    """

    def __init__(
        self,
        processor: ProcessorMixin,
        probe_rows: Sequence[Mapping[str, Any]],
        teacher: PreTrainedModel | None = None,
        *,
        every_n_steps: int = 10,
        accuracy_fn: Callable[[Sequence[Mapping[str, Any]], list[str]], float] | None = None,
        view: str | Callable[[Image.Image], Image.Image] = "pixelate",
        pixelate_ratio: float = 0.1,
        temperature: float = 1.0,
        max_new_tokens: int = 256,
        sampling_temperature: float = 0.7,
        top_p: float = 0.95,
        batch_size: int = 8,
        seed: int = 0,
        measure_at_start: bool = True,
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        if not probe_rows:
            raise ValueError("probe_rows must hold at least one (image, prompt) row.")
        self.processor = processor
        self.probe_rows = list(probe_rows)
        self.teacher = teacher
        self.every_n_steps = every_n_steps
        self.accuracy_fn = accuracy_fn
        self.view = view
        self.pixelate_ratio = pixelate_ratio
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.sampling_temperature = sampling_temperature
        self.top_p = top_p
        self.batch_size = batch_size
        self.seed = seed
        self.measure_at_start = measure_at_start
        self.trajectory: list[dict[str, float]] = []
        self._trainer = None

    def bind_trainer(self, trainer: Any) -> None:
        """Report the measurements to `trainer`'s callbacks (its `report_to` backends among them)."""
        self._trainer = trainer

    def _sample(self, model: PreTrainedModel) -> list[list[int]]:
        """One response per probe row from `model`, cut after the first EOS."""
        tokenizer = _tokenizer(self.processor)
        eos = _eos_ids(model, tokenizer)
        device, _ = _model_device_dtype(model)
        completions: list[list[int]] = []
        with (
            _eval_mode(model),
            torch.no_grad(),
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        ):
            torch.manual_seed(self.seed)
            for start in range(0, len(self.probe_rows), self.batch_size):
                rows = self.probe_rows[start : start + self.batch_size]
                conversations = [_conversation(row["prompt"], row_images(row)) for row in rows]
                inputs = _to_model(tokenize_conversations(self.processor, conversations), model)
                output = model.generate(
                    **inputs,
                    do_sample=True,
                    temperature=self.sampling_temperature,
                    top_p=self.top_p,
                    max_new_tokens=self.max_new_tokens,
                    # Trainers switch the cache off for gradient checkpointing; sampling without it is quadratic
                    use_cache=True,
                )
                new_tokens = output[:, inputs["input_ids"].size(1) :].tolist()
                completions.extend(_cut_at_eos(ids, eos) for ids in new_tokens)
        return completions

    def _scores(self, model: PreTrainedModel, completions: list[list[int]]) -> list[TokenVA]:
        rows = [(row_images(row), row["prompt"], ids) for row, ids in zip(self.probe_rows, completions, strict=True)]
        return score_many(
            model,
            self.processor,
            rows,
            view=self.view,
            pixelate_ratio=self.pixelate_ratio,
            temperature=self.temperature,
            batch_size=self.batch_size,
        )

    def measure(self, model: PreTrainedModel, step: int = 0) -> dict[str, float]:
        """Sample the probe rollouts from `model`, score them, append the record to `trajectory` and return it."""
        completions = self._sample(model)
        record: dict[str, float] = {
            "step": step,
            STUDENT_RELIANCE_KEY: float(_pooled_va(self._scores(model, completions)).mean()),
            RESPONSE_LENGTH_KEY: float(np.mean([len(ids) for ids in completions])),
        }
        if self.teacher is not None:
            record[TEACHER_VA_KEY] = float(_pooled_va(self._scores(self.teacher, completions)).mean())
        if self.accuracy_fn is not None:
            responses = _tokenizer(self.processor).batch_decode(completions, skip_special_tokens=True)
            record[ACCURACY_KEY] = float(self.accuracy_fn(self.probe_rows, responses))
        self.trajectory.append(record)
        return record

    def _measure_and_log(self, args: Any, state: Any, control: Any, model: PreTrainedModel | None) -> None:
        if model is None:
            raise ValueError("VisualRelianceCallback needs the trainer's `model`, which Trainer passes to callbacks.")
        record = self.measure(model, state.global_step)
        # A copy: the trainer owns its log history, the callback its trajectory
        state.log_history.append(dict(record))
        if self._trainer is not None:
            # What `Trainer.log` does with its own logs after recording them: every callback's `on_log`, the
            # reporting integrations included, at the current global step
            metrics = {k: v for k, v in record.items() if k != "step"}
            # The handler's `on_log` clears `should_log`; the trainer's own logging due at this step must still run
            should_log = control.should_log
            self._trainer.callback_handler.on_log(args, state, control, metrics)
            control.should_log = should_log

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.measure_at_start:
            self._measure_and_log(args, state, control, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self._measure_and_log(args, state, control, model)

    def plot_trajectory(self, path: str | Path, label: str = "student", title: str | None = None) -> Path:
        """Plot this run's trajectory; see [`plot_reliance_trajectory`]."""
        return plot_reliance_trajectory({label: self.trajectory}, path, title=title)


def _arrow(ax: Any, start: tuple[float, float], end: tuple[float, float], colour: Any) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=10, color=colour, linewidth=1.2))


def plot_reliance_trajectory(
    trajectories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path, *, title: str | None = None
) -> Path:
    """Plot visual-reliance trajectories of one or more runs (e.g. standard OPD and VA-OPD), as in Figure 4b.

    Left: the student's own visual reliance and the teacher's VA on the student's rollouts against the training step
    (and the accuracy, on a second axis, when measured). Right: the run's path through the (student visual reliance,
    accuracy) plane, or (student visual reliance, teacher VA) without accuracy, with arrows in training order and the
    first and last steps marked: under VA-OPD the paper sees reliance and accuracy rise together.

    Args:
        trajectories: run name -> records of [`VisualRelianceCallback.trajectory`].
        path: where to write the PNG.
        title: optional figure title.

    Returns:
        `path` as a `Path`.
    """
    records = [r for run in trajectories.values() for r in run]
    if not records:
        raise ValueError("Nothing to plot: the trajectories hold no measurement.")
    has_accuracy = all(ACCURACY_KEY in r for r in records)
    has_teacher = all(TEACHER_VA_KEY in r for r in records)
    y_key = ACCURACY_KEY if has_accuracy else TEACHER_VA_KEY if has_teacher else None
    # Run names only label the lines when there is more than one run to tell apart
    prefix = (lambda name: f"{name}: ") if len(trajectories) > 1 else (lambda name: "")

    fig = Figure(figsize=(11 if y_key else 5.5, 4.2), dpi=150, layout="constrained")
    axes = fig.subplots(1, 2 if y_key else 1, squeeze=False)[0]
    steps_ax = axes[0]
    accuracy_ax = steps_ax.twinx() if has_accuracy else None
    for index, (name, run) in enumerate(trajectories.items()):
        colour = colormaps["tab10"](index)
        steps = [r["step"] for r in run]
        steps_ax.plot(
            steps, [r[STUDENT_RELIANCE_KEY] for r in run], "o-", color=colour, label=f"{prefix(name)}student reliance"
        )
        if has_teacher:
            steps_ax.plot(
                steps,
                [r[TEACHER_VA_KEY] for r in run],
                "s--",
                color=colour,
                alpha=0.6,
                label=f"{prefix(name)}teacher VA",
            )
        if accuracy_ax is not None:
            accuracy_ax.plot(
                steps, [r[ACCURACY_KEY] for r in run], "^:", color=colour, alpha=0.8, label=f"{prefix(name)}accuracy"
            )
    steps_ax.set(xlabel="optimizer step", ylabel="mean positive log-prob gap (nats/token)")
    steps_ax.set_ylim(bottom=0)
    steps_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    steps_ax.set_title("Visual reliance on the student's rollouts", fontsize=10)
    steps_ax.grid(alpha=0.3)
    handles, labels = steps_ax.get_legend_handles_labels()
    if accuracy_ax is not None:
        accuracy_ax.set_ylabel("accuracy (right axis)")
        accuracy_ax.set_ylim(-0.03, 1.03)
        more = accuracy_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    steps_ax.legend(handles, labels, fontsize=7, loc="best")

    if y_key is not None:
        plane = axes[1]
        for index, (name, run) in enumerate(trajectories.items()):
            colour = colormaps["tab10"](index)
            points = [(r[STUDENT_RELIANCE_KEY], r[y_key]) for r in run]
            xs, ys = zip(*points, strict=True)
            label = f"{name}: step {run[0]['step']} to {run[-1]['step']}"
            plane.plot(xs, ys, "o", color=colour, label=label, markersize=5)
            for start, end in zip(points[:-1], points[1:], strict=True):
                _arrow(plane, start, end, colour)
            # First and last steps by their markers, named in the legend: text next to the points collides when paths
            # are short or end close together
            plane.plot(*points[0], "o", color=colour, markerfacecolor="white", markersize=9, zorder=3)
            plane.plot(*points[-1], "*", color=colour, markersize=13, zorder=3)
        plane.set_xlim(left=0)
        if has_accuracy:
            plane.set(ylabel="accuracy", ylim=(-0.03, 1.03))
        else:
            plane.set(ylabel="teacher VA (nats/token)", ylim=(0, None))
        plane.set_xlabel("student visual reliance (nats/token)")
        plane.set_title("Trajectory through training", fontsize=10)
        plane.grid(alpha=0.3)
        ends = [
            Line2D([], [], ls="", marker="o", color="0.4", markerfacecolor="white", markersize=9, label="first step"),
            Line2D([], [], ls="", marker="*", color="0.4", markersize=13, label="last step"),
        ]
        plane.legend(handles=[*plane.get_legend_handles_labels()[0], *ends], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=12, fontweight="bold")
    return save_figure(fig, path)
